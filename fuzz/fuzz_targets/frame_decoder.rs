//! Feeds arbitrary bytes to the broker's frame decoder: the length-delimited codec with the
//! broker's frame limit, then the BSON request decoder. Neither may panic, and a frame over
//! the limit must be refused from its length alone.
//!
//! `cargo fuzz run frame_decoder` (from this directory; see the README's fuzzing note).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use queue_runtime::broker::protocol::{self, ClientFrame, Incoming, ServerFrame};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

fuzz_target!(|data: &[u8]| {
    let mut codec = LengthDelimitedCodec::builder().max_frame_length(64 * 1024).new_codec();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        assert!(frame.len() <= 64 * 1024);
        let _ = protocol::decode::<ClientFrame>(&frame);
        let _ = protocol::decode::<ServerFrame>(&frame);
    }
    // The body decoders on their own, without framing, including the ones that read the
    // frequent frames straight from their bytes.
    let _ = protocol::decode::<ClientFrame>(data);
    if let Ok(Incoming::Produce(p)) = Incoming::decode(data) {
        let _ = p.wire_spec();
    }
    let _ = ServerFrame::decode(data);
});
