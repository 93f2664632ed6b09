//! Periodic channels: the slots of a [`Schedule`](crate::spec::Schedule) and the task that
//! produces one message per slot from every consumer of the channel.
//!
//! Each consumer produces the next slot's message ahead, delayed until the slot, with the
//! slot's time as its dedup key; the channel's dedup window spans the longest gap between
//! slots, so however many workers run, the store keeps one message per slot. A slot missed
//! while no worker ran is not made up for.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::adapter::Outgoing;
use crate::clock::{Timestamp, millis};
use crate::error::QueueError;
use crate::queue::Queue;
use crate::spec::ChannelSpec;
use crate::{Message, codec};

/// Encodes the message a channel's type gives for a slot; `None` when it gives none.
pub type SlotPayload = fn(Timestamp) -> Option<Result<Vec<u8>, QueueError>>;

/// [`SlotPayload`] for message type `M`.
pub fn slot_payload<M: Message>(slot: Timestamp) -> Option<Result<Vec<u8>, QueueError>> {
    M::for_slot(slot).map(|m| codec::encode(&m))
}

/// Reads a cron expression: five fields (minute, hour, day of month, month, weekday) or six
/// with seconds first, in UTC.
///
/// # Errors
/// What the parser found wrong.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

/// The first slot of `expr` strictly after `now`, in milliseconds since the Unix epoch.
pub fn cron_next_after(expr: &str, now: Timestamp) -> Option<Timestamp> {
    let cron = parse_cron(expr).ok()?;
    let at = DateTime::<Utc>::from_timestamp_millis(i64::try_from(now).ok()?)?;
    let next = cron.find_next_occurrence(&at, false).ok()?;
    u64::try_from(next.timestamp_millis()).ok()
}

/// The dedup key of a slot's message.
pub fn slot_key(slot: Timestamp) -> u64 {
    codec::explicit_dedup_key(&format!("slot:{slot}"))
}

/// Produces each slot's message ahead, delayed until the slot, for as long as it is polled.
/// Never completes while the queue is open.
pub(crate) async fn produce_slots(queue: Queue, spec: Arc<ChannelSpec>, payload: SlotPayload) {
    let Some(schedule) = spec.schedule.clone() else {
        return futures_util::future::pending().await;
    };
    let clock = queue.clock().clone();
    let mut failures = 0u32;
    loop {
        let now = clock.now();
        let Some(slot) = schedule.next_after(now) else {
            tracing::warn!(channel = %spec.name, "the schedule has no later slot");
            return futures_util::future::pending().await;
        };
        let message = match payload(slot) {
            Some(Ok(bytes)) => bytes,
            Some(Err(e)) => {
                tracing::warn!(channel = %spec.name, error = %e, "a slot's message does not encode");
                return futures_util::future::pending().await;
            }
            None => return futures_util::future::pending().await,
        };
        let out = Outgoing {
            payload: message,
            dedup_key: Some(slot_key(slot)),
            delay: Duration::from_millis(slot - now),
            priority: 0,
            group: None,
        };
        match queue.adapter().produce(&spec, vec![out]).await {
            Ok(_) => {
                failures = 0;
                clock.sleep_until(slot).await;
            }
            Err(QueueError::Closed) => return futures_util::future::pending().await,
            Err(e) => {
                failures = failures.saturating_add(1);
                let pause = Duration::from_millis(50 << failures.min(8));
                tracing::warn!(channel = %spec.name, error = %e, ?pause, "producing a slot failed");
                clock.sleep_until(clock.now() + millis(pause)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_slots_are_read_in_utc() {
        // 2026-01-01T00:00:00Z
        let new_year = 1_767_225_600_000;
        assert_eq!(
            cron_next_after("0 0 * * *", new_year),
            Some(new_year + 86_400_000)
        );
        assert_eq!(
            cron_next_after("*/15 * * * *", new_year + 1),
            Some(new_year + 900_000)
        );
        assert_eq!(
            cron_next_after("*/10 * * * * *", new_year),
            Some(new_year + 10_000)
        );
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("every day").is_err());
    }

    #[test]
    fn slot_keys_differ_per_slot() {
        assert_ne!(slot_key(1_000), slot_key(2_000));
        assert_eq!(slot_key(1_000), slot_key(1_000));
    }
}
