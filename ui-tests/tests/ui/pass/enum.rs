//! An enum message: unit, tuple and struct variants all survive the codec.

use queue_core::{Channel, Message, channel, codec};
use serde::{Deserialize, Serialize};

#[channel("billing/events:v2")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BillingEvent {
    Opened,
    Charged(u64, String),
    Refunded { amount: u64, reason: String },
}

fn name_of<M: Message>() -> &'static str {
    match <M::Channel as Channel>::SPEC.name {
        std::borrow::Cow::Borrowed(name) => name,
        std::borrow::Cow::Owned(_) => unreachable!("names are static"),
    }
}

fn main() {
    assert_eq!(BillingEventChannel::SPEC.name, "billing/events:v2");
    assert_eq!(name_of::<BillingEvent>(), "billing/events:v2");

    for event in [
        BillingEvent::Opened,
        BillingEvent::Charged(1200, "EUR".into()),
        BillingEvent::Refunded {
            amount: 300,
            reason: "duplicate".into(),
        },
    ] {
        let payload = codec::encode(&event).expect("encodes");
        let back: BillingEvent = codec::decode(&payload).expect("decodes");
        assert_eq!(back, event);
    }
}
