//! A struct message: the marker's `SPEC` holds the name and every default, the channel is in
//! the registry, and a message survives the codec.

use std::time::Duration;

use queue_core::{Channel, ChannelSpec, Message, Processing, channel, codec, registry};
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub id: u64,
    pub username: String,
    pub tags: Vec<String>,
}

fn channel_of<M: Message>() -> ChannelSpec {
    <M::Channel as Channel>::SPEC
}

fn main() {
    let spec = UserRegisteredChannel::SPEC;
    assert_eq!(spec.name, "user/registered");
    assert_eq!(spec.processing, Processing::AtLeastOnce);
    assert_eq!(spec.dedup_window, Duration::ZERO);
    assert_eq!(spec.lease, ChannelSpec::DEFAULT_LEASE);
    assert_eq!(spec.max_attempts, ChannelSpec::DEFAULT_MAX_ATTEMPTS);
    assert_eq!(spec.backoff, ChannelSpec::DEFAULT_BACKOFF);
    assert!(!spec.deduplicates());
    assert_eq!(channel_of::<UserRegistered>(), spec);
    assert_eq!(std::mem::size_of::<UserRegisteredChannel>(), 0);

    let decl = registry::channels()
        .find(|d| (d.spec)().name == "user/registered")
        .expect("the channel is registered");
    assert!((decl.message_type)().ends_with("::UserRegistered"));

    let message = UserRegistered {
        id: 7,
        username: "Peter".into(),
        tags: vec!["new".into()],
    };
    let payload = codec::encode(&message).expect("encodes");
    let back: UserRegistered = codec::decode(&payload).expect("decodes");
    assert_eq!(back, message);
}
