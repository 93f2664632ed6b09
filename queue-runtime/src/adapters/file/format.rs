//! The on-disk format of the embedded log (format version 3). See `docs/design.md`.
//!
//! A segment file is a 16-byte header (`QSEG`, the format version as `u16`, two reserved
//! bytes, the segment number as `u64`) followed by records. A record is
//! `len: u32 | crc: u32 | kind: u8 | body`, little endian, where `len` counts `kind` and
//! `body` and `crc` is CRC32C over the same bytes. Each group commit ends with a
//! [`Record::Commit`], which lets recovery tell a torn tail from damage in the middle.

use std::fmt;

use queue_core::clock::Timestamp;
use queue_core::limits;

/// The segment magic.
pub const MAGIC: &[u8; 4] = b"QSEG";
/// The format version written. Version 2 added [`Record::Produced`], version 3 a message's
/// group; segments of versions 1 and 2, which lack them, are read too.
pub const VERSION: u16 = 3;
/// The oldest format version read.
pub const OLDEST_VERSION: u16 = 1;
/// Bytes of the segment header.
pub const HEADER_LEN: usize = 16;
/// Bytes of a record's frame before its kind byte.
pub const FRAME_LEN: usize = 8;
/// The largest record the store writes and reads, from the limits of `queue_core::limits`:
/// a message record with a maximal payload, channel name, dedup key and error text. A
/// produce-key record with [`MAX_BATCH`](queue_core::limits::MAX_BATCH) receipts is smaller.
pub const MAX_RECORD: usize = MAX_MESSAGE_META + queue_core::codec::MAX_PAYLOAD;

/// The largest record read: [`MAX_RECORD`], or the bound of stores written before the limits
/// were enforced, whichever is larger.
pub const READ_LIMIT: usize = if MAX_RECORD > LEGACY_READ_LIMIT {
    MAX_RECORD
} else {
    LEGACY_READ_LIMIT
};
const LEGACY_READ_LIMIT: usize = queue_core::codec::MAX_PAYLOAD + 64 * 1024;

/// A message record's bytes besides its payload, at most: kind, id, produced, due,
/// priority, attempts, flags, dedup key and window, group, channel, dead time and error,
/// payload length.
const MAX_MESSAGE_META: usize = 1
    + 8 * 3
    + 1
    + 4
    + 1
    + 16
    + 8
    + 2
    + limits::MAX_CHANNEL_NAME
    + 8
    + 2
    + limits::MAX_ERROR_TEXT
    + 4;

const _: () = {
    assert!(limits::MAX_CHANNEL_NAME <= u16::MAX as usize);
    assert!(limits::MAX_ERROR_TEXT <= u16::MAX as usize);
    assert!(limits::MAX_PRODUCE_KEY <= u16::MAX as usize);
    assert!(1 + 2 + limits::MAX_PRODUCE_KEY + 8 + 4 + 9 * limits::MAX_BATCH <= MAX_RECORD);
};

const PRODUCE: u8 = 1;
const LEASE: u8 = 2;
const ACK: u8 = 3;
const REQUEUE: u8 = 4;
const DEAD: u8 = 5;
const REDRIVE: u8 = 6;
const PURGE: u8 = 7;
const DEDUP: u8 = 8;
const COMMIT: u8 = 9;
const PRODUCED: u8 = 10;

/// The state a message is written with, for new messages and for relocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord<'a> {
    /// The channel name.
    pub channel: &'a str,
    /// The message id.
    pub id: u64,
    /// When it was produced.
    pub produced_at: Timestamp,
    /// When it is due.
    pub due: Timestamp,
    /// Its priority.
    pub priority: u8,
    /// Deliveries made.
    pub attempts: u32,
    /// `(key, window end)` for a deduplicated message.
    pub dedup: Option<(u64, Timestamp)>,
    /// `(dead_at, error)` for a dead letter.
    pub dead: Option<(Timestamp, &'a str)>,
    /// The group's hash, for a grouped message.
    pub group: Option<u64>,
    /// The BSON payload.
    pub payload: &'a [u8],
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// A message and its state.
    Message(MessageRecord<'a>),
    /// A delivery was made: the message has used `attempts` deliveries.
    Lease {
        /// The message.
        id: u64,
        /// Deliveries made.
        attempts: u32,
    },
    /// The message is done.
    Ack {
        /// The message.
        id: u64,
    },
    /// The message is pending again, due at `due`.
    Requeue {
        /// The message.
        id: u64,
        /// Deliveries made.
        attempts: u32,
        /// When it is due.
        due: Timestamp,
    },
    /// The message moved to the dead-letter queue.
    Dead {
        /// The message.
        id: u64,
        /// Deliveries made.
        attempts: u32,
        /// When.
        dead_at: Timestamp,
        /// Why.
        error: &'a str,
    },
    /// A dead letter went back to its channel with attempts reset.
    Redrive {
        /// The message.
        id: u64,
    },
    /// A dead letter was deleted.
    Purge {
        /// The message.
        id: u64,
    },
    /// A dedup entry, rewritten when the segment of its message is compacted away.
    Dedup {
        /// The channel.
        channel: &'a str,
        /// The key.
        key: u64,
        /// The original message.
        id: u64,
        /// The window end.
        expires: Timestamp,
    },
    /// A produce made under a key: a produce sent again with the same key before `expires`
    /// is answered with these receipts instead of being stored again.
    Produced {
        /// The key the producer chose.
        key: &'a str,
        /// When the key is forgotten.
        expires: Timestamp,
        /// `(id, duplicate)` of each message, in order.
        receipts: Vec<(u64, bool)>,
    },
    /// The end of one group commit, with the counters that must never go backwards.
    Commit {
        /// The next message id to hand out.
        next_id: u64,
        /// The store's open count; fencing tokens of this run start at `epoch << 40`.
        epoch: u64,
    },
}

/// The segment header for segment `number`.
pub fn header(number: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&number.to_le_bytes());
    h
}

/// Why a header is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than 16 bytes.
    Short,
    /// Not a segment file.
    BadMagic,
    /// A version this build does not read.
    Version(u16),
    /// The header names another segment than the file name.
    Number(u64),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Short => f.write_str("segment header is incomplete"),
            HeaderError::BadMagic => f.write_str("not a queue segment (bad magic)"),
            HeaderError::Version(v) => {
                write!(
                    f,
                    "segment format version {v} is not supported (this build reads {OLDEST_VERSION} to {VERSION})"
                )
            }
            HeaderError::Number(n) => write!(f, "segment header names segment {n}"),
        }
    }
}

/// Checks a segment header.
///
/// # Errors
/// What is wrong with it.
pub fn check_header(bytes: &[u8], number: u64) -> Result<(), HeaderError> {
    if bytes.len() < HEADER_LEN {
        return Err(HeaderError::Short);
    }
    if &bytes[..4] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(HeaderError::Version(version));
    }
    let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if n != number {
        return Err(HeaderError::Number(n));
    }
    Ok(())
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Strings in records are held to `queue_core::limits` where they enter, all far below
    /// `u16::MAX` bytes; a longer one is a bug, never cut here.
    fn str16(&mut self, s: &str) {
        let len = u16::try_from(s.len()).expect("record strings are within queue_core::limits");
        self.u16(len);
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Appends `record`, framed, to `out`. Returns the offset of the payload within `out` for a
/// message record.
pub fn encode(record: &Record<'_>, out: &mut Vec<u8>) -> Option<usize> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_LEN]);
    let mut payload_at = None;
    let mut w = Writer(out);
    match record {
        Record::Message(m) => {
            w.u8(PRODUCE);
            w.u64(m.id);
            w.u64(m.produced_at);
            w.u64(m.due);
            w.u8(m.priority);
            w.u32(m.attempts);
            w.u8(u8::from(m.dedup.is_some())
                | (u8::from(m.dead.is_some()) << 1)
                | (u8::from(m.group.is_some()) << 2));
            if let Some((key, expires)) = m.dedup {
                w.u64(key);
                w.u64(expires);
            }
            if let Some(group) = m.group {
                w.u64(group);
            }
            w.str16(m.channel);
            if let Some((dead_at, error)) = m.dead {
                w.u64(dead_at);
                w.str16(error);
            }
            w.u32(u32::try_from(m.payload.len()).expect("payloads are at most 16 MiB"));
            payload_at = Some(w.0.len() - start);
            w.0.extend_from_slice(m.payload);
        }
        Record::Lease { id, attempts } => {
            w.u8(LEASE);
            w.u64(*id);
            w.u32(*attempts);
        }
        Record::Ack { id } => {
            w.u8(ACK);
            w.u64(*id);
        }
        Record::Requeue { id, attempts, due } => {
            w.u8(REQUEUE);
            w.u64(*id);
            w.u32(*attempts);
            w.u64(*due);
        }
        Record::Dead {
            id,
            attempts,
            dead_at,
            error,
        } => {
            w.u8(DEAD);
            w.u64(*id);
            w.u32(*attempts);
            w.u64(*dead_at);
            w.str16(error);
        }
        Record::Redrive { id } => {
            w.u8(REDRIVE);
            w.u64(*id);
        }
        Record::Purge { id } => {
            w.u8(PURGE);
            w.u64(*id);
        }
        Record::Dedup {
            channel,
            key,
            id,
            expires,
        } => {
            w.u8(DEDUP);
            w.str16(channel);
            w.u64(*key);
            w.u64(*id);
            w.u64(*expires);
        }
        Record::Produced {
            key,
            expires,
            receipts,
        } => {
            w.u8(PRODUCED);
            w.str16(key);
            w.u64(*expires);
            w.u32(u32::try_from(receipts.len()).expect("fewer than 4 G receipts"));
            for (id, duplicate) in receipts {
                w.u64(*id);
                w.u8(u8::from(*duplicate));
            }
        }
        Record::Commit { next_id, epoch } => {
            w.u8(COMMIT);
            w.u64(*next_id);
            w.u64(*epoch);
        }
    }
    let body = &out[start + FRAME_LEN..];
    let len = u32::try_from(body.len()).expect("records are smaller than 4 GiB");
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    payload_at
}

/// What reading a record at some offset found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read<'a> {
    /// A record and its total framed length.
    Record(Record<'a>, usize),
    /// The bytes end before the record does.
    Incomplete,
    /// The frame or checksum is wrong, or the body does not parse.
    Damaged(&'static str),
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn str16(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Reads the record at the start of `bytes`.
pub fn decode(bytes: &[u8]) -> Read<'_> {
    if bytes.len() < FRAME_LEN {
        return Read::Incomplete;
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > READ_LIMIT {
        return Read::Damaged("record length out of range");
    }
    let Some(body) = bytes.get(FRAME_LEN..FRAME_LEN + len) else {
        return Read::Incomplete;
    };
    if crc32c::crc32c(body) != crc {
        return Read::Damaged("checksum mismatch");
    }
    match parse(body) {
        Some(r) => Read::Record(r, FRAME_LEN + len),
        None => Read::Damaged("record body does not parse"),
    }
}

fn parse(body: &[u8]) -> Option<Record<'_>> {
    let mut r = Reader { b: body, at: 0 };
    let record = match r.u8()? {
        PRODUCE => {
            let id = r.u64()?;
            let produced_at = r.u64()?;
            let due = r.u64()?;
            let priority = r.u8()?;
            let attempts = r.u32()?;
            let flags = r.u8()?;
            if flags & !0b111 != 0 {
                return None;
            }
            let dedup = if flags & 1 != 0 {
                Some((r.u64()?, r.u64()?))
            } else {
                None
            };
            let group = if flags & 4 != 0 { Some(r.u64()?) } else { None };
            let channel = r.str16()?;
            let dead = if flags & 2 != 0 {
                Some((r.u64()?, r.str16()?))
            } else {
                None
            };
            let n = r.u32()? as usize;
            let payload = r.take(n)?;
            Record::Message(MessageRecord {
                channel,
                id,
                produced_at,
                due,
                priority,
                attempts,
                dedup,
                dead,
                group,
                payload,
            })
        }
        LEASE => Record::Lease {
            id: r.u64()?,
            attempts: r.u32()?,
        },
        ACK => Record::Ack { id: r.u64()? },
        REQUEUE => Record::Requeue {
            id: r.u64()?,
            attempts: r.u32()?,
            due: r.u64()?,
        },
        DEAD => Record::Dead {
            id: r.u64()?,
            attempts: r.u32()?,
            dead_at: r.u64()?,
            error: r.str16()?,
        },
        REDRIVE => Record::Redrive { id: r.u64()? },
        PURGE => Record::Purge { id: r.u64()? },
        DEDUP => Record::Dedup {
            channel: r.str16()?,
            key: r.u64()?,
            id: r.u64()?,
            expires: r.u64()?,
        },
        PRODUCED => {
            let key = r.str16()?;
            let expires = r.u64()?;
            let n = r.u32()? as usize;
            // Each receipt takes 9 bytes: a count beyond what is left is damage.
            if n > (body.len() - r.at) / 9 {
                return None;
            }
            let mut receipts = Vec::with_capacity(n);
            for _ in 0..n {
                let id = r.u64()?;
                let duplicate = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                receipts.push((id, duplicate));
            }
            Record::Produced {
                key,
                expires,
                receipts,
            }
        }
        COMMIT => Record::Commit {
            next_id: r.u64()?,
            epoch: r.u64()?,
        },
        _ => return None,
    };
    (r.at == body.len()).then_some(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record<'static>> {
        vec![
            Record::Message(MessageRecord {
                channel: "user/registered",
                id: 7,
                produced_at: 1,
                due: 2,
                priority: 3,
                attempts: 4,
                dedup: Some((5, 6)),
                dead: Some((8, "boom")),
                group: Some(9),
                payload: b"\x05\x00\x00\x00\x00",
            }),
            Record::Message(MessageRecord {
                channel: "c",
                id: 1,
                produced_at: 0,
                due: 0,
                priority: 0,
                attempts: 0,
                dedup: None,
                dead: None,
                group: None,
                payload: b"",
            }),
            Record::Lease { id: 1, attempts: 2 },
            Record::Ack { id: 3 },
            Record::Requeue {
                id: 4,
                attempts: 5,
                due: 6,
            },
            Record::Dead {
                id: 7,
                attempts: 8,
                dead_at: 9,
                error: "e",
            },
            Record::Redrive { id: 10 },
            Record::Purge { id: 11 },
            Record::Dedup {
                channel: "x",
                key: 12,
                id: 13,
                expires: 14,
            },
            Record::Produced {
                key: "0123456789abcdef",
                expires: 17,
                receipts: vec![(18, false), (19, true)],
            },
            Record::Produced {
                key: "",
                expires: 0,
                receipts: vec![],
            },
            Record::Commit {
                next_id: 15,
                epoch: 16,
            },
        ]
    }

    #[test]
    fn every_record_round_trips() {
        for r in samples() {
            let mut buf = Vec::new();
            let payload_at = encode(&r, &mut buf);
            assert_eq!(decode(&buf), Read::Record(r.clone(), buf.len()));
            if let Record::Message(m) = &r {
                let at = payload_at.expect("message records have a payload");
                assert_eq!(&buf[at..at + m.payload.len()], m.payload);
            }
        }
    }

    /// A string of `len` bytes or a little less, of characters 1 to 4 bytes long.
    fn text(rng: &mut fastrand::Rng, len: usize) -> String {
        const CHARS: [char; 6] = ['a', '{', 'é', '한', '€', '𝄞'];
        let mut s = String::with_capacity(len);
        while s.len() + 4 <= len {
            s.push(CHARS[rng.usize(..CHARS.len())]);
        }
        while s.len() < len {
            s.push('x');
        }
        s
    }

    fn channel_name(rng: &mut fastrand::Rng) -> String {
        const CHARS: &[u8] = b"abcXYZ019_./:-";
        let len = if rng.bool() {
            limits::MAX_CHANNEL_NAME
        } else {
            rng.usize(1..=limits::MAX_CHANNEL_NAME)
        };
        let mut name: String = (0..len)
            .map(|_| char::from(CHARS[rng.usize(..CHARS.len())]))
            .collect();
        name.replace_range(..1, "a");
        name.replace_range(len - 1.., "z");
        assert_eq!(limits::channel_name_problem(&name), None, "{name}");
        name
    }

    /// Error text as the engine keeps it: anything, cut to the limit, with the longest note
    /// of the attempt.
    fn error_text(rng: &mut fastrand::Rng) -> String {
        let len = match rng.u8(..4) {
            0 => limits::MAX_HANDLER_ERROR,
            1 => rng.usize(limits::MAX_HANDLER_ERROR..70_000),
            _ => rng.usize(..limits::MAX_HANDLER_ERROR),
        };
        let cut = limits::cut_error_text(text(rng, len))
            + &format!(" (attempt {} of {})", u32::MAX, u32::MAX);
        assert!(cut.len() <= limits::MAX_ERROR_TEXT);
        cut
    }

    fn check_round_trip(record: &Record<'_>) {
        let mut buf = vec![0xee; 3];
        let payload_at = encode(record, &mut buf);
        let bytes = &buf[3..];
        assert!(
            bytes.len() - FRAME_LEN <= MAX_RECORD,
            "a record of {} bytes is over MAX_RECORD",
            bytes.len()
        );
        // `assert!` rather than `assert_eq!`: a failure must not print 16 MiB.
        assert!(
            decode(bytes) == Read::Record(record.clone(), bytes.len()),
            "a record of {} bytes does not round-trip",
            bytes.len()
        );
        if let (Record::Message(m), Some(at)) = (record, payload_at) {
            assert!(
                &bytes[at..at + m.payload.len()] == m.payload,
                "payload offset"
            );
        }
    }

    #[test]
    fn every_record_at_the_limits_round_trips() {
        let seed = std::env::var("QUEUE_FORMAT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        let mut rng = fastrand::Rng::with_seed(seed);
        let big = vec![0xab; queue_core::codec::MAX_PAYLOAD];
        for case in 0..300 {
            let channel = channel_name(&mut rng);
            let error = error_text(&mut rng);
            let payload = match case % 10 {
                0 => &big[..],
                1 => &big[..rng.usize(..queue_core::codec::MAX_PAYLOAD)],
                _ => &big[..rng.usize(..4096)],
            };
            check_round_trip(&Record::Message(MessageRecord {
                channel: &channel,
                id: rng.u64(..),
                produced_at: rng.u64(..),
                due: rng.u64(..),
                priority: rng.u8(..),
                attempts: rng.u32(..),
                dedup: rng.bool().then(|| (rng.u64(..), rng.u64(..))),
                dead: rng.bool().then(|| (rng.u64(..), error.as_str())),
                group: rng.bool().then(|| rng.u64(..)),
                payload,
            }));
            check_round_trip(&Record::Dead {
                id: rng.u64(..),
                attempts: rng.u32(..),
                dead_at: rng.u64(..),
                error: &error,
            });
            check_round_trip(&Record::Dedup {
                channel: &channel,
                key: rng.u64(..),
                id: rng.u64(..),
                expires: rng.u64(..),
            });
            let key_len = rng.usize(1..=limits::MAX_PRODUCE_KEY);
            let key = text(&mut rng, key_len);
            let receipts = if case % 50 == 0 {
                limits::MAX_BATCH
            } else {
                rng.usize(..100)
            };
            check_round_trip(&Record::Produced {
                key: &key,
                expires: rng.u64(..),
                receipts: (0..receipts).map(|_| (rng.u64(..), rng.bool())).collect(),
            });
            check_round_trip(&Record::Lease {
                id: rng.u64(..),
                attempts: rng.u32(..),
            });
            check_round_trip(&Record::Ack { id: rng.u64(..) });
            check_round_trip(&Record::Requeue {
                id: rng.u64(..),
                attempts: rng.u32(..),
                due: rng.u64(..),
            });
            check_round_trip(&Record::Redrive { id: rng.u64(..) });
            check_round_trip(&Record::Purge { id: rng.u64(..) });
            check_round_trip(&Record::Commit {
                next_id: rng.u64(..),
                epoch: rng.u64(..),
            });
        }
    }

    #[test]
    fn the_largest_record_is_exactly_max_record() {
        let channel = "c".repeat(limits::MAX_CHANNEL_NAME);
        let error = "e".repeat(limits::MAX_ERROR_TEXT);
        let payload = vec![0; queue_core::codec::MAX_PAYLOAD];
        let mut buf = Vec::new();
        encode(
            &Record::Message(MessageRecord {
                channel: &channel,
                id: 1,
                produced_at: 2,
                due: 3,
                priority: 4,
                attempts: 5,
                dedup: Some((6, 7)),
                dead: Some((8, &error)),
                group: Some(9),
                payload: &payload,
            }),
            &mut buf,
        );
        assert_eq!(buf.len() - FRAME_LEN, MAX_RECORD);
        assert!(matches!(decode(&buf), Read::Record(..)));
    }

    #[test]
    fn a_flipped_bit_or_a_cut_is_detected() {
        let mut buf = Vec::new();
        encode(&samples()[0], &mut buf);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(
                !matches!(decode(&bad), Read::Record(..)),
                "flip at {i} went unnoticed"
            );
            assert!(
                !matches!(decode(&buf[..i]), Read::Record(..)),
                "cut at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn headers_check_magic_version_and_number() {
        let h = header(42);
        assert_eq!(check_header(&h, 42), Ok(()));
        assert_eq!(check_header(&h, 41), Err(HeaderError::Number(42)));
        assert_eq!(check_header(&h[..10], 42), Err(HeaderError::Short));
        let mut v = h;
        v[4] = 9;
        assert_eq!(check_header(&v, 42), Err(HeaderError::Version(9)));
        v[4] = 1;
        assert_eq!(check_header(&v, 42), Ok(()), "version 1 is still read");
        v[4] = 0;
        assert_eq!(check_header(&v, 42), Err(HeaderError::Version(0)));
        let mut m = h;
        m[0] = b'X';
        assert_eq!(check_header(&m, 42), Err(HeaderError::BadMagic));
    }
}
