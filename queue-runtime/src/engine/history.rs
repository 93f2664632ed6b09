//! Delivery histories for the dashboard ([`queue_core::Histories`]): each message's
//! deliveries and their outcomes, in memory, while enabled. Fed from the engine's take and
//! settle paths and from the changes it journals.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use queue_core::adapter::HISTORIES_KEPT;
use queue_core::clock::Timestamp;
use queue_core::{MessageId, Outcome, Step};

use super::state::Change;

/// The most steps kept of one message.
const STEPS_KEPT: usize = 64;

/// How many recent lease hold times a channel keeps.
const HOLDS_KEPT: usize = 1024;

/// Histories by message, and the order they began in, for eviction; and each channel's
/// recent lease hold times (delivery to settle).
#[derive(Debug, Default)]
pub struct History {
    steps: HashMap<MessageId, Vec<Step>>,
    order: VecDeque<MessageId>,
    holds: HashMap<String, VecDeque<u64>>,
}

impl History {
    fn push(&mut self, id: MessageId, step: Step) {
        if let Some(steps) = self.steps.get_mut(&id) {
            // A message snoozed without end keeps only its latest steps.
            if steps.len() >= STEPS_KEPT {
                steps.drain(..STEPS_KEPT / 2);
            }
            steps.push(step);
            return;
        }
        while self.steps.len() >= HISTORIES_KEPT {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.steps.remove(&old);
        }
        // Ids of histories that ended are dropped from the order now and then.
        if self.order.len() >= 2 * HISTORIES_KEPT {
            let steps = &self.steps;
            self.order.retain(|id| steps.contains_key(id));
        }
        self.order.push_back(id);
        self.steps.insert(id, vec![step]);
    }

    /// A delivery was handed out.
    pub fn delivered(
        &mut self,
        id: MessageId,
        attempt: u32,
        token: u64,
        consumer: u64,
        at: Timestamp,
    ) {
        self.push(id, step(at, "delivered", attempt, token, consumer, None));
    }

    /// A delivery of `channel` was settled with `outcome`.
    pub fn settled(
        &mut self,
        channel: &str,
        id: MessageId,
        token: u64,
        outcome: &Outcome,
        at: Timestamp,
    ) {
        let attempt = self.attempt_of(id, token);
        let delivered = self.steps.get(&id).and_then(|s| {
            s.iter()
                .rev()
                .find(|s| s.token == token && s.event == "delivered")
        });
        if let Some(d) = delivered {
            let held = at.saturating_sub(d.at);
            let holds = match self.holds.get_mut(channel) {
                Some(holds) => holds,
                None => self.holds.entry(channel.to_string()).or_default(),
            };
            if holds.len() == HOLDS_KEPT {
                holds.pop_front();
            }
            holds.push_back(held);
        }
        let (event, error) = match outcome {
            Outcome::Ack => ("acked", None),
            Outcome::Retry { error, .. } => ("retried", Some(error.clone())),
            Outcome::DeadLetter { error } => ("dead_lettered", Some(error.clone())),
            Outcome::Release => ("released", None),
            Outcome::Snooze { .. } => ("snoozed", None),
        };
        self.push(id, step(at, event, attempt, token, 0, error));
    }

    /// The attempt of the delivery holding `token`.
    fn attempt_of(&self, id: MessageId, token: u64) -> u32 {
        self.steps
            .get(&id)
            .and_then(|s| s.iter().rev().find(|s| s.token == token))
            .map_or(0, |s| s.attempt)
    }

    /// What journaled changes tell beyond takes and settles: a lease that lapsed or a holder
    /// that went away, a death from it, a redrive; an ack or deletion ends a history.
    pub fn changed(&mut self, changes: &[Change], at: Timestamp) {
        for change in changes {
            match change {
                Change::Acked { id } | Change::Purged { id } => {
                    self.steps.remove(id);
                }
                Change::Requeued { id, attempts, .. } | Change::Died { id, attempts, .. } => {
                    // After a delivery the change is news: the lease lapsed or its holder
                    // went away. After a settle it repeats the settle, but a retry of the
                    // last attempt is a death.
                    let Some(last) = self.steps.get(id).and_then(|s| s.last()) else {
                        continue;
                    };
                    let lapsed = last.event == "delivered";
                    let retried = last.event == "retried";
                    let died = match change {
                        Change::Died { error, .. } => Some(error.clone()),
                        _ => None,
                    };
                    if lapsed {
                        self.push(*id, step(at, "lapsed", *attempts, 0, 0, None));
                    }
                    if died.is_some() && (lapsed || retried) {
                        self.push(*id, step(at, "dead_lettered", *attempts, 0, 0, died));
                    }
                }
                Change::Redriven { id } => self.push(*id, step(at, "redriven", 0, 0, 0, None)),
                Change::Leased { .. } => {}
            }
        }
    }

    /// The steps of `id`.
    pub fn of(&self, id: MessageId) -> Vec<Step> {
        self.steps.get(&id).cloned().unwrap_or_default()
    }

    /// The median and 95th percentile of `channel`'s recent lease hold times, in ms.
    pub fn held(&self, channel: &str) -> Option<(u64, u64)> {
        let mut holds: Vec<u64> = self.holds.get(channel)?.iter().copied().collect();
        if holds.is_empty() {
            return None;
        }
        holds.sort_unstable();
        let at = |q: f64| holds[((holds.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.95)))
    }
}

fn step(
    at: Timestamp,
    event: &str,
    attempt: u32,
    token: u64,
    consumer: u64,
    error: Option<String>,
) -> Step {
    Step {
        at,
        event: event.to_string(),
        attempt,
        token,
        consumer,
        error,
    }
}

/// Histories behind a switch: nothing is kept until it is turned on.
#[derive(Debug, Default)]
pub struct Histories {
    on: std::sync::atomic::AtomicBool,
    history: Mutex<History>,
}

impl Histories {
    /// Turns keeping on.
    pub fn turn_on(&self) {
        self.on.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether histories are kept.
    pub fn on(&self) -> bool {
        self.on.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Runs `f` on the histories when they are kept.
    pub fn with(&self, f: impl FnOnce(&mut History)) {
        if self.on.load(std::sync::atomic::Ordering::Acquire) {
            f(&mut self.history.lock());
        }
    }

    /// The steps of `id`.
    pub fn of(&self, id: MessageId) -> Vec<Step> {
        self.history.lock().of(id)
    }

    /// `channel`'s recent lease hold times: median and 95th percentile, in ms.
    pub fn held(&self, channel: &str) -> Option<(u64, u64)> {
        self.history.lock().held(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_follows_deliveries_and_ends_with_the_ack() {
        let mut h = History::default();
        let id = MessageId(7);
        h.delivered(id, 1, 100, 3, 10);
        let retry = Outcome::Retry {
            after: None,
            error: "smtp down".into(),
        };
        h.settled("c", id, 100, &retry, 11);
        h.changed(
            &[Change::Requeued {
                id,
                attempts: 1,
                due: 20,
            }],
            11,
        );
        h.delivered(id, 2, 101, 4, 20);
        h.changed(
            &[Change::Requeued {
                id,
                attempts: 2,
                due: 50,
            }],
            30,
        );
        let events: Vec<(String, u32, u64)> = h
            .of(id)
            .into_iter()
            .map(|s| (s.event, s.attempt, s.token))
            .collect();
        let want = [
            ("delivered", 1, 100),
            ("retried", 1, 100),
            ("delivered", 2, 101),
            ("lapsed", 2, 0),
        ];
        let want: Vec<(String, u32, u64)> = want
            .iter()
            .map(|(e, a, t)| (e.to_string(), *a, *t))
            .collect();
        assert_eq!(events, want);
        assert_eq!(h.of(id)[1].error.as_deref(), Some("smtp down"));
        h.changed(&[Change::Acked { id }], 60);
        assert!(h.of(id).is_empty());
    }

    #[test]
    fn hold_times_run_from_the_delivery_to_its_settle() {
        let mut h = History::default();
        for n in 0..20 {
            let id = MessageId(n);
            h.delivered(id, 1, n, 1, 1000);
            h.settled("c", id, n, &Outcome::Ack, 1000 + n);
        }
        assert_eq!(h.held("c"), Some((10, 18)));
        assert_eq!(h.held("other"), None);
        // A settle whose delivery is not in the history has no hold time.
        h.settled("d", MessageId(99), 7, &Outcome::Ack, 5);
        assert_eq!(h.held("d"), None);
    }

    #[test]
    fn a_message_keeps_only_its_latest_steps() {
        let mut h = History::default();
        let id = MessageId(1);
        for n in 0..1000 {
            h.delivered(id, 1, n, 1, n);
        }
        let steps = h.of(id);
        assert!(steps.len() <= STEPS_KEPT, "{}", steps.len());
        assert_eq!(steps.last().unwrap().token, 999);
    }

    #[test]
    fn past_the_bound_the_oldest_history_goes() {
        let mut h = History::default();
        for n in 0..=HISTORIES_KEPT as u64 {
            h.delivered(MessageId(n), 1, n, 1, 0);
        }
        assert!(h.of(MessageId(0)).is_empty());
        assert_eq!(h.of(MessageId(1)).len(), 1);
        assert_eq!(h.steps.len(), HISTORIES_KEPT);
    }
}
