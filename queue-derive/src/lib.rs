//! The `#[channel]` and `#[consumer]` attributes. Use them through `queue_core` or
//! `queue_runtime`, which re-export them; generated code refers to whichever of the two the
//! calling crate depends on.
//!
//! Each attribute parses its input into a small IR that keeps spans, runs a list of named
//! checks that collect every mistake, and expands only validated IR. On error the user's item
//! is emitted unchanged next to the errors, so one mistake does not cascade.

mod channel;
mod common;
mod consumer;

use proc_macro::TokenStream;

/// Declares a channel on a struct or enum: `#[channel("name", options…)]`.
///
/// Options: `exactly_once` or `at_least_once` (the default); `dedup = "5m"` (exactly-once
/// only, default 5 minutes); `lease = "30s"`; `max_attempts = 10`; `backoff = "1s"`;
/// `group = field` (messages with the same value of `field` leave in produce order);
/// `concurrency = N` and `concurrency_per_group = N` (deliveries in flight);
/// `rate = "100/1s"` and `rate_per_group = "5/1m"` (deliveries started per window);
/// `every = "1h"` or `cron = "0 0 * * *"` (a periodic channel, whose message type implements
/// `Default`).
#[proc_macro_attribute]
pub fn channel(args: TokenStream, item: TokenStream) -> TokenStream {
    channel::expand(args.into(), item.into()).into()
}

/// Declares a consumer: `#[consumer]` or `#[consumer(max_parallel = N)]` on
/// `async fn f(msg: T, deps: Dep<X>…) -> Result<(), E>`. Workers find every consumer linked
/// into the binary.
#[proc_macro_attribute]
pub fn consumer(args: TokenStream, item: TokenStream) -> TokenStream {
    consumer::expand(args.into(), item.into()).into()
}
