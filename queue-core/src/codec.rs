//! The payload codec: every message is one BSON document `{ "v": <message> }`, so structs,
//! enums, newtypes and scalars all encode the same way. The dedup key is a 64-bit XXH3 hash of
//! those bytes.

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
