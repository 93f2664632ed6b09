//! The conformance suite: every guarantee of the queue contract, as behaviours that every
//! adapter must pass unchanged. An adapter's test file includes this module and calls
//! [`conformance_suite!`] with an async factory `fn(VirtualClock) -> (Queue, guard)`, where the guard keeps
//! whatever the queue needs alive until the test ends.
//!
//! Time moves only through the virtual clock. Waits on real time appear only as generous
//! upper bounds (a failing adapter times out instead of hanging) and in `still_waiting`,
//! which checks that something does *not* happen.

#![allow(dead_code)]

pub mod cases;
pub mod flow;
pub mod traces;

use std::future::Future;
use std::time::Duration;

use queue_core::{ChannelStats, Queue, RawDelivery, Subscription, VirtualClock};

/// A queue under test and the clock its rules read.
pub struct Harness {
    pub queue: Queue,
    pub clock: VirtualClock,
    /// Whatever must live as long as the queue (a temporary directory, a server).
    pub guard: Box<dyn std::any::Any + Send>,
}

impl Harness {
    /// Moves the virtual clock and lets spawned tasks react.
    pub async fn advance(&self, by: Duration) {
        self.clock.advance(by);
        settle().await;
    }

    /// The stats of one channel (zeroes if it is unknown yet).
    pub async fn stats(&self, channel: &str) -> ChannelStats {
        self.queue
            .stats()
            .await
            .expect("stats")
            .into_iter()
            .find(|s| s.channel == channel)
            .unwrap_or_default()
    }
}

/// Lets spawned tasks run.
pub async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// Awaits `fut`, failing the test if it takes longer than 10 s of real time.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The next delivery of a subscription, within 10 s.
pub async fn next(sub: &dyn Subscription) -> RawDelivery {
    within("a delivery", sub.next()).await.expect("delivery")
}

/// Checks that `fut` has not completed after 150 ms of real time and gives it back.
pub async fn still_waiting<F: Future + Unpin>(mut fut: F) -> F
where
    F::Output: std::fmt::Debug,
{
    let poll = tokio::time::timeout(Duration::from_millis(150), &mut fut).await;
    if let Ok(v) = poll {
        panic!("expected nothing yet, got {v:?}");
    }
    fut
}

/// Waits until `cond` holds, checking every 5 ms for up to 10 s.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        loop {
            if cond().await {
                return;
            }
            settle().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Expands to one `#[tokio::test]` per behaviour, each with a fresh queue from `$factory`.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:path) => {
        $crate::conformance_suite!(@cases $factory;
            produce_returns_a_distinct_id_per_message,
            a_produced_message_is_delivered_with_its_payload,
            batch_produce_returns_receipts_in_order,
            an_acked_message_is_gone,
            equal_priority_messages_leave_in_produce_order,
            higher_priority_messages_leave_first,
            a_delayed_message_waits_for_its_due_time,
            a_message_is_held_by_one_consumer_at_a_time,
            competing_consumers_share_the_backlog_without_overlap,
            max_parallel_bounds_unsettled_deliveries,
            a_lapsed_lease_goes_to_another_consumer,
            a_redelivery_carries_a_larger_fencing_token,
            ack_with_a_stale_token_is_refused,
            nack_with_a_stale_token_is_refused,
            extend_with_a_stale_token_is_refused,
            an_extended_lease_keeps_the_message,
            a_delivery_cannot_be_settled_twice,
            a_failed_delivery_is_retried_after_backoff,
            backoff_doubles_with_each_attempt,
            retry_after_overrides_the_backoff,
            after_max_attempts_the_message_is_dead_lettered_with_its_last_error,
            dead_letter_moves_a_message_at_once,
            a_lapsed_lease_on_the_last_attempt_dead_letters,
            redrive_returns_dead_letters_with_attempts_reset,
            redrive_of_chosen_ids_leaves_the_others,
            purge_deletes_dead_letters,
            purge_deletes_pending_messages_and_leaves_those_in_flight,
            a_paused_channel_delivers_nothing_until_resumed,
            cancel_deletes_pending_messages_and_refuses_the_settle_of_one_in_flight,
            a_running_handler_learns_its_message_was_cancelled,
            snooze_delivers_again_later_without_counting_the_attempt,
            release_gives_a_message_back_without_counting_the_attempt,
            settle_many_settles_each_on_its_own,
            a_dropped_subscription_releases_its_messages_at_once,
            a_subscription_dropped_on_the_last_attempt_dead_letters_the_message,
            exactly_once_drops_a_duplicate_inside_the_window,
            the_dedup_window_is_fixed_at_the_first_produce,
            the_dedup_window_outlives_the_ack,
            explicit_dedup_keys_deduplicate_different_payloads,
            a_dedup_key_on_an_at_least_once_channel_is_refused,
            at_least_once_channels_accept_equal_payloads,
            channels_are_independent,
            stats_count_every_state,
            peek_shows_pending_messages_without_taking_them,
            an_oversized_payload_is_refused_and_nothing_is_stored,
            a_channel_name_beyond_the_limits_is_refused_and_nothing_is_stored,
            a_long_error_text_is_cut_on_a_character_boundary_with_a_marker,
            a_typed_consumer_acks_on_ok,
            a_handler_error_is_retried_and_its_text_kept,
            a_panicking_handler_is_retried,
            a_poison_payload_is_dead_lettered_at_once,
            a_consumer_dropped_while_handling_gives_the_message_to_another,
            the_consumer_extends_the_lease_while_the_handler_runs,
            the_consumer_extends_each_running_lease_until_its_handler_returns,
            a_delivery_handler_sees_id_attempt_and_token,
            a_delivery_handler_can_retry_and_dead_letter_by_hand,
            stopping_a_consumer_waits_for_running_handlers,
            a_closed_queue_refuses_work,
            groups_keep_produce_order_under_retries_across_two_consumers,
            concurrency_per_group_lets_that_many_of_a_group_run,
            a_global_concurrency_limit_holds_across_subscriptions,
            a_rate_limit_delivers_its_budget_per_window_and_no_more,
            a_rate_per_group_bounds_each_group,
            a_periodic_channel_fires_once_per_slot_with_two_workers,
            a_trace_runs_from_produce_to_handle_through_a_retry,
        );
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::traces::traces();
                let clock = ::queue_core::VirtualClock::default();
                let (queue, guard) = $factory(clock.clone()).await;
                let harness = $crate::conformance::Harness { queue, clock, guard };
                $crate::conformance::cases::$case(&harness).await;
                let _ = harness.queue.close().await;
            }
        )*
    };
}
