//! The payload codec: every message is one BSON document `{ "v": <message> }`, so structs,
//! enums, newtypes and scalars all encode the same way. The dedup key is a 64-bit XXH3 hash of
//! those bytes. A traced produce appends the W3C trace context to the same document as the
//! strings `tp` (`traceparent`) and `ts` (`tracestate`) after the key is taken.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::QueueError;

/// The largest payload a queue accepts: the BSON document limit, 16 MiB.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: &'a T,
}

#[derive(Deserialize)]
struct Envelope<T> {
    v: T,
}

/// Encodes a message as its BSON payload.
///
/// # Errors
/// [`QueueError::Encode`] when the value cannot be represented in BSON (an integer above
/// `i64::MAX`, a map with non-string keys), [`QueueError::PayloadTooLarge`] above
/// [`MAX_PAYLOAD`].
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, QueueError> {
    let bytes = with_scratch(|buf| bson::serialize_to_buffer(&EnvelopeRef { v: message }, buf))
        .map_err(|e| QueueError::Encode(e.to_string()))?;
    if bytes.len() > MAX_PAYLOAD {
        return Err(QueueError::PayloadTooLarge {
            size: bytes.len(),
            max: MAX_PAYLOAD,
        });
    }
    Ok(bytes)
}

/// Runs `write` on this thread's scratch buffer and returns a copy of what it wrote: one
/// allocation of the exact size, instead of a buffer grown step by step.
pub fn with_scratch<E>(write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<Vec<u8>, E> {
    /// A scratch buffer larger than this after use is not kept.
    const KEEP: usize = 64 * 1024;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        // A serializer that encodes another message while it runs gets a buffer of its own.
        let Ok(mut buf) = scratch.try_borrow_mut() else {
            let mut own = Vec::new();
            write(&mut own)?;
            return Ok(own);
        };
        buf.clear();
        let result = write(&mut buf).map(|()| buf.to_vec());
        if buf.capacity() > KEEP {
            *buf = Vec::new();
        }
        result
    })
}

/// Decodes a payload produced by [`encode`].
///
/// # Errors
/// [`QueueError::Decode`] when the bytes are not BSON or do not match `T`.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, QueueError> {
    bson::deserialize_from_slice::<Envelope<T>>(payload)
        .map(|e| e.v)
        .map_err(|e| QueueError::Decode(e.to_string()))
}

/// The dedup key of a payload: XXH3-64 of its bytes.
pub fn dedup_key(payload: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(payload)
}

/// The dedup key of an explicit, caller-chosen key string. Hashed with a different seed from
/// payload keys so the two never collide by construction.
pub fn explicit_dedup_key(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), 0x006b_6579)
}

/// The largest `tracestate` carried; a longer one is left out (the W3C limit is 512 bytes).
pub const MAX_TRACE_STATE: usize = 512;

/// Appends the trace context `traceparent` and `tracestate` to an encoded payload, unless the
/// payload would then exceed [`MAX_PAYLOAD`] or the bytes are not one BSON document.
pub fn add_trace(payload: &mut Vec<u8>, traceparent: &str, tracestate: &str) {
    let tracestate = if tracestate.len() > MAX_TRACE_STATE {
        ""
    } else {
        tracestate
    };
    let extra = 4 + 4 + traceparent.len() + 1 + 4 + 4 + tracestate.len() + 1;
    if payload.len() + extra > MAX_PAYLOAD || document_len(payload) != Some(payload.len()) {
        return;
    }
    payload.pop();
    for (key, value) in [("tp", traceparent), ("ts", tracestate)] {
        if value.is_empty() {
            continue;
        }
        payload.push(0x02);
        payload.extend_from_slice(key.as_bytes());
        payload.push(0);
        let len = i32::try_from(value.len() + 1).unwrap_or(i32::MAX);
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
    }
    payload.push(0);
    let total = i32::try_from(payload.len()).unwrap_or(i32::MAX);
    payload[..4].copy_from_slice(&total.to_le_bytes());
}

/// The trace context a traced produce left in a payload: `(traceparent, tracestate)`, the
/// second empty when none was given.
pub fn trace_of(payload: &[u8]) -> Option<(&str, &str)> {
    let doc = bson::RawDocument::from_bytes(payload).ok()?;
    // `get` answers a missing key without building an error.
    let text = |key: &str| match doc.get(key) {
        Ok(Some(bson::RawBsonRef::String(s))) => Some(s),
        _ => None,
    };
    Some((text("tp")?, text("ts").unwrap_or("")))
}

/// The length a BSON document's bytes declare.
fn document_len(bytes: &[u8]) -> Option<usize> {
    let head: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    usize::try_from(i32::from_le_bytes(head)).ok()
}

/// A payload as a generic BSON value, for tools that show messages without knowing their type.
///
/// # Errors
/// [`QueueError::Decode`] when the bytes are not a BSON envelope.
pub fn decode_value(payload: &[u8]) -> Result<bson::Bson, QueueError> {
    decode::<bson::Bson>(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes its inner message while it is itself being encoded.
    struct Nested(u64);

    impl Serialize for Nested {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let inner = encode(&self.0).map_err(serde::ser::Error::custom)?;
            s.serialize_bytes(&inner)
        }
    }

    #[test]
    fn an_encoder_may_encode_while_it_encodes_and_big_messages_round_trip() {
        let outer = encode(&Nested(42)).unwrap();
        let inner: serde_bytes_like::Bytes = decode(&outer).unwrap();
        assert_eq!(decode::<u64>(&inner.0).unwrap(), 42);
        let big = "한".repeat(100_000);
        assert_eq!(decode::<String>(&encode(&big).unwrap()).unwrap(), big);
        assert_eq!(decode::<u64>(&encode(&7_u64).unwrap()).unwrap(), 7);
    }

    mod serde_bytes_like {
        /// A BSON binary read back as bytes.
        pub struct Bytes(pub Vec<u8>);

        impl<'de> serde::Deserialize<'de> for Bytes {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(Bytes(bson::Binary::deserialize(d)?.bytes))
            }
        }
    }

    #[test]
    fn a_trace_context_rides_in_the_envelope_and_the_message_still_decodes() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut payload = encode(&"hello").unwrap();
        let untraced = payload.clone();
        assert_eq!(trace_of(&payload), None);
        add_trace(&mut payload, tp, "k=v");
        assert_eq!(trace_of(&payload), Some((tp, "k=v")));
        assert_eq!(decode::<String>(&payload).unwrap(), "hello");
        assert_eq!(
            decode_value(&payload).unwrap(),
            bson::Bson::String("hello".into())
        );
        let mut plain = untraced.clone();
        add_trace(&mut plain, tp, "");
        assert_eq!(trace_of(&plain), Some((tp, "")));
        let mut long = untraced.clone();
        add_trace(&mut long, tp, &"k=v,".repeat(200));
        assert_eq!(
            trace_of(&long),
            Some((tp, "")),
            "an oversized tracestate is left out"
        );
        let mut not_bson = b"\x05\x00".to_vec();
        add_trace(&mut not_bson, tp, "");
        assert_eq!(
            not_bson, b"\x05\x00",
            "bytes that are not one document stay as they are"
        );
        let mut full = encode(&"x".repeat(MAX_PAYLOAD - 40)).unwrap();
        let before = full.clone();
        add_trace(&mut full, tp, "");
        assert_eq!(
            full, before,
            "a trace never pushes a payload past the limit"
        );
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct User {
        id: u64,
        name: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Event {
        Started,
        Moved { x: i32 },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct UserId(u32);

    #[test]
    fn structs_enums_and_newtypes_round_trip() {
        let u = User {
            id: 7,
            name: "Peter".into(),
        };
        assert_eq!(decode::<User>(&encode(&u).unwrap()).unwrap(), u);
        for e in [Event::Started, Event::Moved { x: -3 }] {
            assert_eq!(decode::<Event>(&encode(&e).unwrap()).unwrap(), e);
        }
        assert_eq!(
            decode::<UserId>(&encode(&UserId(9)).unwrap()).unwrap(),
            UserId(9)
        );
    }

    #[test]
    fn a_payload_of_another_type_is_a_decode_error() {
        let bytes = encode(&User {
            id: 1,
            name: "a".into(),
        })
        .unwrap();
        let err = decode::<Event>(&bytes).unwrap_err();
        assert!(matches!(err, QueueError::Decode(_)), "{err:?}");
        assert!(matches!(
            decode::<User>(b"garbage"),
            Err(QueueError::Decode(_))
        ));
    }

    #[test]
    fn equal_payloads_share_a_dedup_key_and_different_ones_do_not() {
        let a = encode(&User {
            id: 1,
            name: "a".into(),
        })
        .unwrap();
        let b = encode(&User {
            id: 1,
            name: "a".into(),
        })
        .unwrap();
        let c = encode(&User {
            id: 2,
            name: "a".into(),
        })
        .unwrap();
        assert_eq!(dedup_key(&a), dedup_key(&b));
        assert_ne!(dedup_key(&a), dedup_key(&c));
        assert_ne!(explicit_dedup_key("x"), dedup_key(b"x"));
    }

    #[test]
    fn an_oversized_message_is_refused() {
        let big = "x".repeat(MAX_PAYLOAD);
        assert!(matches!(
            encode(&big),
            Err(QueueError::PayloadTooLarge { .. })
        ));
    }
}
