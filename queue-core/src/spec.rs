//! Channel declarations: the [`Channel`] trait, its [`ChannelSpec`] and the [`Message`] link
//! from a message type back to its channel.

use std::borrow::Cow;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// How a channel treats repeated produces of the same message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Processing {
    /// Every produce is a new message; a handler may see a message more than once after a
    /// crash or a lapsed lease.
    AtLeastOnce,
    /// Produces of the same payload (or the same explicit dedup key) inside the channel's
    /// dedup window are dropped and answered with the original message id. Delivery is still
    /// fenced by a lease, and the ack is durable: see the crate docs for what this promises.
    ExactlyOnce,
}

/// Everything the queue needs to know about a channel. Built at compile time by
/// `#[channel]`; adapters receive it with every produce and subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSpec {
    /// The channel name: 1 to 255 bytes of `[A-Za-z0-9_./:-]`, no `/` at either end
    /// (see [`crate::limits`]).
    pub name: Cow<'static, str>,
    /// At-least-once or exactly-once.
    pub processing: Processing,
    /// How long a produce is remembered for deduplication; zero for at-least-once channels.
    pub dedup_window: Duration,
    /// How long a delivery may be held before it goes to another consumer, unless extended.
    pub lease: Duration,
    /// Deliveries after which a failing message moves to the dead-letter queue.
    pub max_attempts: u32,
    /// The delay before the first retry; doubled for each later attempt.
    pub backoff: Duration,
    /// The longest delay between two attempts.
    pub max_backoff: Duration,
    /// The most deliveries in flight at once across every consumer of every process; 0 for
    /// no limit.
    pub concurrency: u32,
    /// The most deliveries in flight at once per group (see [`Message::group`]); 1 keeps
    /// each group in produce order.
    pub concurrency_per_group: u32,
    /// The most deliveries the channel starts per window, across every consumer.
    pub rate: Option<Rate>,
    /// The most deliveries each group starts per window.
    pub rate_per_group: Option<Rate>,
    /// When the workers consuming the channel produce a message on their own.
    pub schedule: Option<Schedule>,
}

/// A rate limit: at most `limit` deliveries start in each `per`-long window. Windows are
/// aligned on the Unix epoch, so every process and store counts the same windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rate {
    /// Deliveries per window, at least 1.
    pub limit: u32,
    /// The window, at least 1 ms.
    pub per: Duration,
}

impl Rate {
    /// The window that holds `now`: `(start, end)` in milliseconds since the Unix epoch.
    pub fn window(&self, now: Timestamp) -> (Timestamp, Timestamp) {
        let per = crate::clock::millis(self.per).max(1);
        let start = now - now % per;
        (start, start.saturating_add(per))
    }
}

/// When a periodic channel fires: one message per slot, produced by whichever workers consume
/// it, deduplicated on the slot's time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Every `period`, on multiples of it since the Unix epoch (`1d` fires at 00:00 UTC).
    Every(Duration),
    /// A cron expression, in UTC: five fields (minute to weekday) or six (seconds first).
    Cron(Cow<'static, str>),
}

impl Schedule {
    /// The first slot strictly after `now` (milliseconds since the Unix epoch); `None` when
    /// the schedule has no later slot or cannot be read.
    pub fn next_after(&self, now: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Every(period) => {
                let p = crate::clock::millis(*period).max(1);
                (now / p).checked_add(1)?.checked_mul(p)
            }
            Schedule::Cron(expr) => crate::periodic::cron_next_after(expr, now),
        }
    }
}

impl ChannelSpec {
    /// The default lease: 30 seconds.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    /// The default dedup window of an `exactly_once` channel: 5 minutes.
    pub const DEFAULT_DEDUP: Duration = Duration::from_secs(300);
    /// The default number of deliveries before dead-lettering: 10.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
    /// The default first retry delay: 1 second.
    pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
    /// The cap on retry delays: 15 minutes.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(900);

    /// An at-least-once channel with default settings.
    pub const fn new(name: &'static str) -> Self {
        ChannelSpec {
            name: Cow::Borrowed(name),
            processing: Processing::AtLeastOnce,
            dedup_window: Duration::ZERO,
            lease: Self::DEFAULT_LEASE,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            backoff: Self::DEFAULT_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            concurrency: 0,
            concurrency_per_group: 1,
            rate: None,
            rate_per_group: None,
            schedule: None,
        }
    }

    /// Checks what an adapter relies on: the name's length and characters.
    ///
    /// # Errors
    /// [`crate::QueueError::InvalidRequest`] saying what is wrong.
    pub fn check(&self) -> Result<(), crate::QueueError> {
        crate::limits::check_channel_name(&self.name)?;
        let bad = |what: String| {
            Err(crate::QueueError::InvalidRequest(format!(
                "channel `{}`: {what}",
                self.name
            )))
        };
        if self.concurrency_per_group == 0 {
            return bad("`concurrency_per_group` must be at least 1".into());
        }
        for (what, rate) in [("rate", self.rate), ("rate_per_group", self.rate_per_group)] {
            if let Some(r) = rate
                && (r.limit == 0 || r.per < Duration::from_millis(1))
            {
                return bad(format!("`{what}` must allow at least 1 per at least 1ms"));
            }
        }
        if let Some(Schedule::Cron(expr)) = &self.schedule
            && let Err(e) = crate::periodic::parse_cron(expr)
        {
            return bad(format!("cron `{expr}`: {e}"));
        }
        Ok(())
    }

    /// Makes the channel exactly-once with the given dedup window.
    #[must_use]
    pub const fn exactly_once(mut self, window: Duration) -> Self {
        self.processing = Processing::ExactlyOnce;
        self.dedup_window = window;
        self
    }

    /// Sets the lease.
    #[must_use]
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the number of deliveries before dead-lettering.
    #[must_use]
    pub const fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Sets the first retry delay.
    #[must_use]
    pub const fn backoff(mut self, first: Duration) -> Self {
        self.backoff = first;
        self
    }

    /// Bounds the deliveries in flight across every consumer.
    #[must_use]
    pub const fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// Bounds the deliveries in flight per group.
    #[must_use]
    pub const fn concurrency_per_group(mut self, n: u32) -> Self {
        self.concurrency_per_group = n;
        self
    }

    /// Starts at most `limit` deliveries per `per`.
    #[must_use]
    pub const fn rate(mut self, limit: u32, per: Duration) -> Self {
        self.rate = Some(Rate { limit, per });
        self
    }

    /// Starts at most `limit` deliveries per `per` in each group.
    #[must_use]
    pub const fn rate_per_group(mut self, limit: u32, per: Duration) -> Self {
        self.rate_per_group = Some(Rate { limit, per });
        self
    }

    /// Fires every `period`: exactly once, as the dedup window is the period.
    #[must_use]
    pub const fn every(self, period: Duration) -> Self {
        let mut s = self.exactly_once(period);
        // A const fn cannot drop the old value; it holds no heap data worth freeing here.
        std::mem::forget(s.schedule.replace(Schedule::Every(period)));
        s
    }

    /// Fires on a cron expression; `longest_gap` is the longest time between two of its
    /// slots, the dedup window that keeps each slot to one message.
    #[must_use]
    pub const fn cron(self, expr: &'static str, longest_gap: Duration) -> Self {
        let mut s = self.exactly_once(longest_gap);
        std::mem::forget(s.schedule.replace(Schedule::Cron(Cow::Borrowed(expr))));
        s
    }

    /// Whether produces are deduplicated.
    pub fn deduplicates(&self) -> bool {
        self.processing == Processing::ExactlyOnce && !self.dedup_window.is_zero()
    }

    /// The delay before attempt `attempt + 1` after `attempt` failed deliveries: the backoff
    /// doubled per attempt, capped, with "equal jitter" (a uniform draw from the upper half),
    /// so that a burst of failures does not retry in lockstep. `unit` is a draw from `[0, 1)`.
    pub fn retry_delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let full = self
            .backoff
            .saturating_mul(1u32 << exp.min(31))
            .min(self.max_backoff.max(self.backoff));
        let half = full / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A channel: a zero-sized marker type generated by `#[channel]`, tying a name and its
/// settings to one message type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a channel",
    label = "not a channel marker",
    note = "declare a channel with `#[channel(\"name\")]` on the message type and use its `Channel` marker"
)]
pub trait Channel: Send + Sync + 'static {
    /// The one message type this channel carries.
    type Message: Message<Channel = Self>;
    /// The channel's name and settings.
    const SPEC: ChannelSpec;
}

/// A message type declared with `#[channel]`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a channel message type",
    label = "not declared with `#[channel]`",
    note = "add `#[channel(\"name\")]` to the declaration of `{Self}`"
)]
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The channel this type is declared on.
    type Channel: Channel<Message = Self>;

    /// The group this message belongs to (`#[channel(…, group = field)]`), as
    /// [`GroupKey::group_hash`] gives it: messages of one group leave in produce order, at
    /// most [`ChannelSpec::concurrency_per_group`] in flight at once.
    fn group(&self) -> Option<u64> {
        None
    }

    /// The message a periodic channel's workers produce for the slot at `slot` (milliseconds
    /// since the Unix epoch); `None` for channels without a schedule.
    fn for_slot(slot: Timestamp) -> Option<Self> {
        let _ = slot;
        None
    }
}

/// A value that can name a message group: strings, integers, `char` and `bool`, and
/// references to them. Equal values name the same group whatever their integer width.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a group key",
    label = "not a group key",
    note = "a group key is a string, an integer, a `char` or a `bool` (or a reference to one): a value that is equal exactly when the group is the same"
)]
pub trait GroupKey {
    /// The group's hash: xxh3 of a tagged, width-independent encoding of the value, never 0.
    fn group_hash(&self) -> u64;
}

fn group_hash_of(tag: u8, bytes: &[u8]) -> u64 {
    let mut buf = Vec::with_capacity(1 + bytes.len());
    buf.push(tag);
    buf.extend_from_slice(bytes);
    xxhash_rust::xxh3::xxh3_64_with_seed(&buf, 0x0067_726f_7570).max(1)
}

impl GroupKey for str {
    fn group_hash(&self) -> u64 {
        group_hash_of(b's', self.as_bytes())
    }
}

impl GroupKey for String {
    fn group_hash(&self) -> u64 {
        self.as_str().group_hash()
    }
}

impl GroupKey for char {
    fn group_hash(&self) -> u64 {
        let mut b = [0; 4];
        self.encode_utf8(&mut b).group_hash()
    }
}

impl GroupKey for bool {
    fn group_hash(&self) -> u64 {
        group_hash_of(b'b', &[u8::from(*self)])
    }
}

impl<T: GroupKey + ?Sized> GroupKey for &T {
    fn group_hash(&self) -> u64 {
        (**self).group_hash()
    }
}

impl<T: GroupKey + ?Sized> GroupKey for Box<T> {
    fn group_hash(&self) -> u64 {
        (**self).group_hash()
    }
}

impl<T: GroupKey + ?Sized + ToOwned> GroupKey for Cow<'_, T> {
    fn group_hash(&self) -> u64 {
        self.as_ref().group_hash()
    }
}

macro_rules! integer_group_keys {
    ($($t:ty),*) => {$(
        impl GroupKey for $t {
            fn group_hash(&self) -> u64 {
                group_hash_of(b'i', &i128::from(*self).to_le_bytes())
            }
        }
    )*};
}
integer_group_keys!(u8, u16, u32, u64, i8, i16, i32, i64, i128);

impl GroupKey for usize {
    fn group_hash(&self) -> u64 {
        (*self as u64).group_hash()
    }
}

impl GroupKey for isize {
    fn group_hash(&self) -> u64 {
        (*self as i64).group_hash()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys_ignore_integer_width_and_tell_kinds_apart() {
        assert_eq!(42u8.group_hash(), 42u64.group_hash());
        assert_eq!((-3i16).group_hash(), (-3i64).group_hash());
        assert_ne!(42u64.group_hash(), "42".group_hash());
        assert_eq!("a".group_hash(), String::from("a").group_hash());
        assert_eq!('a'.group_hash(), "a".group_hash());
        assert_ne!(1u64.group_hash(), 2u64.group_hash());
        assert_ne!(true.group_hash(), 1u8.group_hash());
    }

    #[test]
    fn rate_windows_are_aligned_on_the_epoch() {
        let r = Rate {
            limit: 1,
            per: Duration::from_secs(1),
        };
        assert_eq!(r.window(0), (0, 1_000));
        assert_eq!(r.window(1_999), (1_000, 2_000));
        assert_eq!(r.window(2_000), (2_000, 3_000));
    }

    #[test]
    fn every_fires_on_multiples_of_its_period() {
        let s = Schedule::Every(Duration::from_secs(60));
        assert_eq!(s.next_after(0), Some(60_000));
        assert_eq!(s.next_after(59_999), Some(60_000));
        assert_eq!(s.next_after(60_000), Some(120_000));
    }

    #[test]
    fn a_spec_with_a_zero_limit_is_refused() {
        assert!(ChannelSpec::new("t").check().is_ok());
        assert!(
            ChannelSpec::new("t")
                .concurrency_per_group(0)
                .check()
                .is_err()
        );
        assert!(
            ChannelSpec::new("t")
                .rate(0, Duration::from_secs(1))
                .check()
                .is_err()
        );
        assert!(
            ChannelSpec::new("t")
                .rate(1, Duration::ZERO)
                .check()
                .is_err()
        );
        let cron = ChannelSpec::new("t").cron("not cron", Duration::from_secs(60));
        assert!(cron.check().is_err());
    }

    #[test]
    fn retry_delay_doubles_per_attempt_and_stays_in_the_upper_half() {
        let spec = ChannelSpec::new("t").backoff(Duration::from_millis(100));
        for attempt in 1..=5u32 {
            let full = Duration::from_millis(100 * (1 << (attempt - 1)));
            assert_eq!(spec.retry_delay(attempt, 0.0), full / 2);
            assert_eq!(spec.retry_delay(attempt, 1.0), full);
            let mid = spec.retry_delay(attempt, 0.5);
            assert!(
                mid > full / 2 && mid < full,
                "{mid:?} not inside ({:?}, {full:?})",
                full / 2
            );
        }
    }

    #[test]
    fn retry_delay_is_capped_at_max_backoff() {
        let spec = ChannelSpec::new("t").backoff(Duration::from_secs(1));
        assert_eq!(spec.retry_delay(40, 1.0), ChannelSpec::DEFAULT_MAX_BACKOFF);
        assert_eq!(
            spec.retry_delay(u32::MAX, 1.0),
            ChannelSpec::DEFAULT_MAX_BACKOFF
        );
    }
}
