//! Generated code names everything by absolute path: user items that shadow prelude and
//! library names, and a local `queue_core` module, change nothing.

#![allow(dead_code)]

use std::fmt;

use ::queue_core::{channel, consumer};
use serde::{Deserialize, Serialize};

mod queue_core {}
mod inventory {}
mod core {}

type Result<T> = ::std::result::Result<T, Failure>;
struct Option;
struct String;
struct Vec;
struct Box;
struct Some;
struct None;
struct Ok;
struct Err;
struct Duration;
struct Clone;
struct Default;
struct Send;
struct Sync;
struct Sized;
struct Future;
struct Deps;
struct ChannelSpec;
struct GroupKey;
struct PeriodicPayload;
trait Fn {}
fn type_name() {}
fn __spec() {}
fn __build() {}

#[derive(Debug)]
struct Failure;

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("failure")
    }
}

#[channel("hygiene/checked", exactly_once, lease = "5s", max_attempts = 2)]
#[derive(Debug, ::core::clone::Clone, Serialize, Deserialize)]
pub struct Checked {
    pub id: u64,
}

#[channel("hygiene/grouped", group = key, concurrency = 2, rate = "10/1s")]
#[derive(Serialize, Deserialize)]
pub struct Grouped {
    pub key: u64,
}

#[channel("hygiene/periodic", every = "1h")]
#[derive(::core::default::Default, Serialize, Deserialize)]
pub struct Periodic;

#[consumer(max_parallel = 2)]
async fn check(message: Checked) -> Result<()> {
    if message.id == 0 {
        return ::std::result::Result::Err(Failure);
    }
    ::std::result::Result::Ok(())
}

fn main() {
    use ::queue_core::Channel;
    assert_eq!(CheckedChannel::SPEC.name, "hygiene/checked");
    assert_eq!(CheckedChannel::SPEC.max_attempts, 2);
    let decl = ::queue_core::registry::consumers()
        .find(|c| c.name == "check")
        .expect("the consumer is registered");
    assert_eq!(decl.max_parallel, 2);
    assert_eq!((decl.spec)().name, "hygiene/checked");

    use ::queue_core::Message;
    assert_eq!(GroupedChannel::SPEC.concurrency, 2);
    assert!(Grouped { key: 1 }.group().is_some());
    assert!(Periodic::for_slot(0).is_some());
}
