//! A newtype struct message: encoded as its inner value, declared like any other channel.

use queue_core::{Channel, channel, codec};
use serde::{Deserialize, Serialize};

#[channel("orders/cancelled", max_attempts = 2)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled(pub u64);

fn main() {
    let spec = <OrderCancelledChannel as Channel>::SPEC;
    assert_eq!(spec.name, "orders/cancelled");
    assert_eq!(spec.max_attempts, 2);

    let payload = codec::encode(&OrderCancelled(42)).expect("encodes");
    assert_eq!(payload, codec::encode(&42u64).expect("encodes"));
    let back: OrderCancelled = codec::decode(&payload).expect("decodes");
    assert_eq!(back, OrderCancelled(42));
}
