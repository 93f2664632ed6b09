//! The frames sent most, written and read by hand: produce requests and their receipts,
//! deliveries and settles. What is written is the bytes serde writes for the same values
//! (the tests compare them), so either side may still read them with serde; only the cost
//! differs.

use bytes::Bytes;
use queue_core::{QueueError, Receipt};

use super::{WireDelivery, WireOutgoing, WireRate, WireSpec, malformed};

/// A BSON value read in place: documents, arrays, binaries and strings are left as bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Value<'a> {
    Int32(i32),
    Int64(i64),
    Bool(bool),
    Null,
    /// A string's bytes, not yet checked to be UTF-8.
    Str(&'a [u8]),
    Binary(&'a [u8]),
    /// A whole embedded document, length and terminator included.
    Document(&'a [u8]),
    /// A whole array, as a document whose keys are indexes.
    Array(&'a [u8]),
    /// Any other type, skipped.
    Other,
}

/// The elements of a BSON document, each read once, in order. An element that does not fit
/// its document ends the iteration with an error.
pub(super) struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// Reads the elements of document `doc`.
///
/// # Errors
/// When its length prefix or terminator is wrong.
pub(super) fn fields(doc: &[u8]) -> Result<Fields<'_>, QueueError> {
    if doc.len() < 5 || i32_at(doc, 0) != Some(len(doc.len())) || doc[doc.len() - 1] != 0 {
        return Err(malformed("a document's length is wrong"));
    }
    Ok(Fields { bytes: doc, at: 4 })
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn i64_at(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl<'a> Fields<'a> {
    /// The element at `self.at`, and where the next one starts.
    fn element(&self) -> Option<(&'a [u8], Value<'a>, usize)> {
        let b = self.bytes;
        // The document's terminator is not part of any element.
        let end = b.len() - 1;
        let kind = b[self.at];
        let key_at = self.at + 1;
        let nul = key_at + b.get(key_at..end)?.iter().position(|&c| c == 0)?;
        let key = &b[key_at..nul];
        let v = nul + 1;
        let sized = |n: usize| (v + n <= end).then_some(v + n);
        // A string: length, bytes, NUL.
        let string = || {
            let n = usize::try_from(i32_at(b, v)?).ok().filter(|n| *n >= 1)?;
            let next = (v + 4).checked_add(n).filter(|next| *next <= end)?;
            (b[next - 1] == 0).then(|| (&b[v + 4..next - 1], next))
        };
        // An embedded document or array: its own length, ending in NUL.
        let nested = || {
            let n = usize::try_from(i32_at(b, v)?).ok().filter(|n| *n >= 5)?;
            let next = v.checked_add(n).filter(|next| *next <= end)?;
            (b[next - 1] == 0).then(|| (&b[v..next], next))
        };
        let (value, next) = match kind {
            0x01 | 0x09 | 0x11 => (Value::Other, sized(8)?),
            0x02 => string().map(|(s, next)| (Value::Str(s), next))?,
            0x0D | 0x0E => string().map(|(_, next)| (Value::Other, next))?,
            0x03 => nested().map(|(d, next)| (Value::Document(d), next))?,
            0x04 => nested().map(|(d, next)| (Value::Array(d), next))?,
            0x05 => {
                let n = usize::try_from(i32_at(b, v)?).ok()?;
                let next = (v + 5).checked_add(n).filter(|next| *next <= end)?;
                let data = &b[v + 5..next];
                let data = match b[v + 4] {
                    // The old binary subtype holds its length again before the bytes.
                    0x02 => data
                        .get(4..)
                        .filter(|rest| i32_at(data, 0) == Some(len(rest.len())))?,
                    _ => data,
                };
                (Value::Binary(data), next)
            }
            0x07 => (Value::Other, sized(12)?),
            0x08 => match b.get(v).filter(|_| v < end)? {
                0 => (Value::Bool(false), v + 1),
                1 => (Value::Bool(true), v + 1),
                _ => return None,
            },
            0x0A => (Value::Null, v),
            0x06 | 0x7F | 0xFF => (Value::Other, v),
            0x0B => {
                let first = v + b.get(v..end)?.iter().position(|&c| c == 0)? + 1;
                let second = first + b.get(first..end)?.iter().position(|&c| c == 0)? + 1;
                (Value::Other, second)
            }
            0x0C => {
                let (_, after) = string()?;
                let next = after + 12;
                (next <= end).then_some((Value::Other, next))?
            }
            0x0F => {
                let n = usize::try_from(i32_at(b, v)?).ok().filter(|n| *n >= 14)?;
                (Value::Other, v.checked_add(n).filter(|next| *next <= end)?)
            }
            0x10 => (Value::Int32(i32_at(b, v)?), sized(4)?),
            0x12 => (Value::Int64(i64_at(b, v)?), sized(8)?),
            0x13 => (Value::Other, sized(16)?),
            _ => return None,
        };
        Some((key, value, next))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(&'a [u8], Value<'a>), QueueError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.bytes.len() - 1 {
            return None;
        }
        match self.element() {
            Some((key, value, next)) => {
                self.at = next;
                Some(Ok((key, value)))
            }
            None => {
                self.at = self.bytes.len();
                Some(Err(malformed("an element does not fit its document")))
            }
        }
    }
}

/// A BSON document being written into a buffer; [`Doc::end`] closes it.
struct Doc<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Doc<'a> {
    fn new(buf: &'a mut Vec<u8>) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&[0; 4]);
        Doc { buf, start }
    }

    fn key(&mut self, kind: u8, key: &str) {
        self.buf.push(kind);
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.push(0);
    }

    fn i64(&mut self, key: &str, v: i64) {
        self.key(0x12, key);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn i32(&mut self, key: &str, v: i32) {
        self.key(0x10, key);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn bool(&mut self, key: &str, v: bool) {
        self.key(0x08, key);
        self.buf.push(u8::from(v));
    }

    fn null(&mut self, key: &str) {
        self.key(0x0A, key);
    }

    fn opt_i64(&mut self, key: &str, v: Option<i64>) {
        match v {
            Some(v) => self.i64(key, v),
            None => self.null(key),
        }
    }

    fn str(&mut self, key: &str, s: &str) {
        self.key(0x02, key);
        self.buf.extend_from_slice(&len(s.len() + 1).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
    }

    fn binary(&mut self, key: &str, b: &[u8]) {
        self.key(0x05, key);
        self.buf.extend_from_slice(&len(b.len()).to_le_bytes());
        self.buf.push(0);
        self.buf.extend_from_slice(b);
    }

    fn doc(&mut self, key: &str) -> Doc<'_> {
        self.key(0x03, key);
        Doc::new(self.buf)
    }

    fn array(&mut self, key: &str) -> Doc<'_> {
        self.key(0x04, key);
        Doc::new(self.buf)
    }

    fn rate(&mut self, key: &str, rate: Option<WireRate>) {
        match rate {
            Some(r) => {
                let mut d = self.doc(key);
                d.i64("limit", r.limit);
                d.i64("per_ms", r.per_ms);
                d.end();
            }
            None => self.null(key),
        }
    }

    fn end(self) {
        self.buf.push(0);
        let n = len(self.buf.len() - self.start);
        self.buf[self.start..self.start + 4].copy_from_slice(&n.to_le_bytes());
    }
}

/// A length as BSON writes it. Frames are far below 2 GiB (the codec refuses larger ones).
fn len(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The key of element `i` of an array: its index in decimal.
fn index(i: usize, digits: &mut [u8; 20]) -> &str {
    let mut at = digits.len();
    let mut n = i;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&digits[at..]).expect("ascii digits")
}

/// A produce request: `ClientFrame { id, request: Request::Produce { spec, messages, key } }`.
pub fn produce(id: i64, spec: &WireSpec, messages: &[WireOutgoing], key: Option<&str>) -> Bytes {
    let payloads: usize = messages.iter().map(|m| m.payload.0.len()).sum();
    let mut buf = Vec::with_capacity(400 + payloads + 80 * messages.len());
    let mut frame = Doc::new(&mut buf);
    frame.i64("id", id);
    frame.str("op", "produce");
    let mut s = frame.doc("spec");
    s.str("name", &spec.name);
    s.bool("exactly_once", spec.exactly_once);
    s.i64("dedup_ms", spec.dedup_ms);
    s.i64("lease_ms", spec.lease_ms);
    s.i64("max_attempts", spec.max_attempts);
    s.i64("backoff_ms", spec.backoff_ms);
    s.i64("max_backoff_ms", spec.max_backoff_ms);
    s.i64("concurrency", spec.concurrency);
    s.i64("concurrency_per_group", spec.concurrency_per_group);
    s.rate("rate", spec.rate);
    s.rate("rate_per_group", spec.rate_per_group);
    s.opt_i64("every_ms", spec.every_ms);
    match &spec.cron {
        Some(expr) => s.str("cron", expr),
        None => s.null("cron"),
    }
    s.end();
    let mut list = frame.array("messages");
    let mut digits = [0; 20];
    for (i, m) in messages.iter().enumerate() {
        let mut d = list.doc(index(i, &mut digits));
        d.binary("payload", &m.payload.0);
        d.opt_i64("dedup_key", m.dedup_key);
        d.i64("delay_ms", m.delay_ms);
        d.i32("priority", m.priority);
        d.opt_i64("group", m.group);
        d.end();
    }
    list.end();
    match key {
        Some(key) => frame.str("key", key),
        None => frame.null("key"),
    }
    frame.end();
    Bytes::from(buf)
}

/// The answer to a produce: `ServerFrame::Reply { id, reply: Reply::Receipts { .. } }`.
pub fn receipts(id: i64, receipts: &[Receipt]) -> Bytes {
    let mut buf = Vec::with_capacity(128 + 32 * receipts.len());
    let mut frame = Doc::new(&mut buf);
    frame.str("kind", "reply");
    frame.i64("id", id);
    let mut reply = frame.doc("reply");
    reply.str("reply", "receipts");
    let mut list = reply.array("receipts");
    let mut digits = [0; 20];
    for (i, r) in receipts.iter().enumerate() {
        let mut pair = list.array(index(i, &mut digits));
        pair.i64("0", r.id.0 as i64);
        pair.bool("1", r.duplicate);
        pair.end();
    }
    list.end();
    reply.end();
    frame.end();
    Bytes::from(buf)
}

/// A pushed delivery: `ServerFrame::Delivery { sub, delivery }`.
pub fn delivery(sub: i64, d: &WireDelivery) -> Bytes {
    let mut buf = Vec::with_capacity(200 + d.lease.channel.len() + d.payload.0.len());
    let mut frame = Doc::new(&mut buf);
    frame.str("kind", "delivery");
    frame.i64("sub", sub);
    let mut body = frame.doc("delivery");
    let mut lease = body.doc("lease");
    lease.str("channel", &d.lease.channel);
    lease.i64("id", d.lease.id);
    lease.i64("token", d.lease.token);
    lease.end();
    body.binary("payload", &d.payload.0);
    body.i64("attempt", d.attempt);
    body.i32("priority", d.priority);
    body.i64("produced_at", d.produced_at);
    body.i64("lease_ms", d.lease_ms);
    body.end();
    frame.end();
    Bytes::from(buf)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use queue_core::{ChannelSpec, Lease, MessageId, RawDelivery};

    use super::super::{Blob, ClientFrame, Reply, Request, ServerFrame, encode, receipts_to_wire};
    use super::*;

    #[test]
    fn the_hand_written_frames_are_the_bytes_serde_writes() {
        let specs = [
            ChannelSpec::new("a/b"),
            ChannelSpec::new("a/b")
                .exactly_once(Duration::from_secs(1))
                .concurrency(7)
                .concurrency_per_group(2)
                .rate(100, Duration::from_secs(1))
                .rate_per_group(5, Duration::from_secs(60)),
            ChannelSpec::new("p").every(Duration::from_secs(60)),
            ChannelSpec::new("p").cron("0 0 * * *", Duration::from_secs(86_400)),
        ];
        let message = |i: u8| WireOutgoing {
            payload: Blob(vec![i; usize::from(i) * 3]),
            dedup_key: i.is_multiple_of(2).then_some(-(i64::from(i))),
            delay_ms: i64::from(i) * 1000,
            priority: i32::from(i),
            group: i.is_multiple_of(3).then_some(i64::MAX - i64::from(i)),
        };
        for spec in &specs {
            for n in [0, 1, 12] {
                let messages: Vec<WireOutgoing> = (0..n).map(message).collect();
                for key in [None, Some("k-1")] {
                    let frame = ClientFrame {
                        id: 1 << 40,
                        request: Request::Produce {
                            spec: spec.into(),
                            messages: messages.clone(),
                            key: key.map(str::to_string),
                        },
                    };
                    let spec = WireSpec::from(spec);
                    assert_eq!(
                        produce(1 << 40, &spec, &messages, key),
                        encode(&frame).unwrap(),
                        "{frame:?}"
                    );
                }
            }
        }

        for n in [0, 1, 11] {
            let list: Vec<Receipt> = (0..n)
                .map(|i| Receipt {
                    id: MessageId(u64::MAX - i),
                    duplicate: i % 2 == 1,
                })
                .collect();
            let frame = ServerFrame::Reply {
                id: -7,
                reply: Reply::Receipts {
                    receipts: receipts_to_wire(&list),
                },
            };
            assert_eq!(receipts(-7, &list), encode(&frame).unwrap());
        }

        let d = WireDelivery::new(
            RawDelivery {
                lease: Lease {
                    channel: "jobs/x".into(),
                    id: MessageId(u64::MAX - 3),
                    token: (7 << 40) + 9,
                },
                payload: vec![5; 300],
                attempt: 3,
                priority: 200,
                produced_at: 1_700_000_000_000,
                deadline: 0,
            },
            Duration::from_millis(30_000),
        );
        let frame = ServerFrame::Delivery {
            sub: 4,
            delivery: d.clone(),
        };
        assert_eq!(delivery(4, &d), encode(&frame).unwrap());
    }

    #[test]
    fn array_keys_count_in_decimal() {
        let mut digits = [0; 20];
        for (i, s) in [(0, "0"), (9, "9"), (10, "10"), (1234, "1234")] {
            assert_eq!(index(i, &mut digits), s);
        }
        assert_eq!(index(usize::MAX, &mut digits), usize::MAX.to_string());
    }
}
