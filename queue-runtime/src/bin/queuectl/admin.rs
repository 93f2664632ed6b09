//! `queuectl stats | watch | peek | dlq | produce`: inspect and repair a queue.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use queue_core::{ChannelSpec, ChannelStats, MessageId, Outgoing, Queue, codec};
use queue_runtime::dashboard::api;

/// Where the queue is.
#[derive(Debug, Args)]
pub struct Target {
    /// Queue URL (`file://…`, `queue://…`, `postgres://…`, `nats://…`); `QUEUE_URL` by default.
    #[arg(long, env = "QUEUE_URL", default_value = queue_runtime::DEFAULT_URL)]
    pub url: String,
}

impl Target {
    pub async fn open(&self) -> Result<Queue> {
        queue_runtime::connect(&self.url)
            .await
            .with_context(|| format!("opening {}", self.url))
    }
}

/// Options of `queuectl stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print the dashboard API's overview document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `queuectl watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub target: Target,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
}

/// Options of `queuectl peek`.
#[derive(Debug, Args)]
pub struct PeekArgs {
    #[command(flatten)]
    pub target: Target,
    /// The channel.
    pub channel: String,
    /// How many messages to show.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Print the dashboard API's JSON document instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// Options of `queuectl pause` and `queuectl resume`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    #[command(flatten)]
    pub target: Target,
    /// The channel.
    pub channel: String,
}

/// Options of `queuectl cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub target: Target,
    /// The channel.
    pub channel: String,
    /// The message id.
    pub id: u64,
}

/// Options of `queuectl purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub target: Target,
    /// The channel.
    pub channel: String,
    /// Required: every ready and delayed message of the channel is deleted.
    #[arg(long)]
    pub yes: bool,
}

/// `queuectl dlq …`.
#[derive(Debug, Subcommand)]
pub enum Dlq {
    /// List dead letters with their last error.
    List {
        #[command(flatten)]
        target: Target,
        /// The channel.
        channel: String,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print the dashboard API's JSON document (grouped by error) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back into their channel with attempts reset.
    Redrive {
        #[command(flatten)]
        target: Target,
        /// The channel.
        channel: String,
        /// Only these message ids (default: all).
        #[arg(long = "id")]
        ids: Vec<u64>,
    },
    /// Delete dead letters.
    Purge {
        #[command(flatten)]
        target: Target,
        /// The channel.
        channel: String,
        /// Only these message ids (default: all).
        #[arg(long = "id")]
        ids: Vec<u64>,
        /// Required to purge every dead letter of the channel.
        #[arg(long)]
        yes: bool,
    },
}

/// Options of `queuectl produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub target: Target,
    /// The channel.
    pub channel: String,
    /// The message as JSON; it is stored as BSON.
    #[arg(long)]
    pub json: String,
    /// Declare the channel `exactly_once` with this dedup window (e.g. `5m`).
    #[arg(long, value_parser = crate::bench::parse_duration)]
    pub dedup: Option<Duration>,
    /// Hold the message this long before it is delivered.
    #[arg(long, value_parser = crate::bench::parse_duration)]
    pub delay: Option<Duration>,
    /// Higher leaves first.
    #[arg(long, default_value_t = 0)]
    pub priority: u8,
}

fn ids(ids: &[u64]) -> Option<Vec<MessageId>> {
    (!ids.is_empty()).then(|| ids.iter().map(|i| MessageId(*i)).collect())
}

fn table(stats: &[ChannelStats], rates: Option<(&[ChannelStats], Duration)>) -> String {
    let mut out = format!(
        "{:<28} {:>9} {:>8} {:>9} {:>7} {:>11} {:>11} {:>8} {:>6} {:>6} {:>10}",
        "CHANNEL",
        "READY",
        "DELAYED",
        "IN FLIGHT",
        "DEAD",
        "PRODUCED",
        "ACKED",
        "RETRIED",
        "CONS",
        "STATE",
        "NEXT DUE"
    );
    let now = queue_core::clock::millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    if rates.is_some() {
        out.push_str(&format!(" {:>10} {:>10}", "IN/s", "ACKED/s"));
    }
    out.push('\n');
    for s in stats {
        out.push_str(&format!(
            "{:<28} {:>9} {:>8} {:>9} {:>7} {:>11} {:>11} {:>8} {:>6} {:>6} {:>10}",
            s.channel,
            s.ready,
            s.delayed,
            s.in_flight,
            s.dead,
            s.produced,
            s.acked,
            s.retried,
            s.consumers,
            if s.paused { "paused" } else { "active" },
            s.next_due
                .map_or_else(|| "-".to_string(), |due| due_in(due, now))
        ));
        if let Some((before, dt)) = rates {
            let prev = before.iter().find(|b| b.channel == s.channel);
            let rate = |now: u64, then: Option<u64>| {
                then.map_or(0.0, |t| {
                    now.saturating_sub(t) as f64 / dt.as_secs_f64().max(1e-3)
                })
            };
            out.push_str(&format!(
                " {:>10.0} {:>10.0}",
                rate(s.produced, prev.map(|p| p.produced)),
                rate(s.acked, prev.map(|p| p.acked))
            ));
        }
        out.push('\n');
    }
    if stats.is_empty() {
        out.push_str("(no channels)\n");
    }
    if let Some(since) = stats
        .iter()
        .map(|s| s.counted_since)
        .filter(|&t| t > 0)
        .min()
    {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(since);
        out.push_str(&format!(
            "PRODUCED, ACKED and RETRIED count since {}\n",
            humantime::format_rfc3339_seconds(at)
        ));
    }
    out
}

/// An age to the tenth of a second below a minute, else to the second: `4.2s`, `3m 10s`.
fn age(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

/// How long until `due`, to the second: `in 4m 10s`, or `now` once it has passed.
fn due_in(due: u64, now: u64) -> String {
    if due <= now {
        return "now".into();
    }
    let secs = (due - now).div_ceil(1_000);
    format!(
        "in {}",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

pub async fn stats(args: StatsArgs) -> Result<()> {
    let queue = args.target.open().await?;
    if args.json {
        let overview = api::overview(&queue, None, |_| (api::Rates::default(), None)).await?;
        println!("{}", serde_json::to_string_pretty(&overview)?);
    } else {
        print!("{}", table(&queue.stats().await?, None));
    }
    queue.close().await?;
    Ok(())
}

pub async fn watch(args: WatchArgs) -> Result<()> {
    let queue = args.target.open().await?;
    let interval = Duration::from_secs_f64(args.interval.max(0.1));
    let mut before = queue.stats().await?;
    let mut at = Instant::now();
    let mut shown = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep(interval) => {}
        }
        let now = queue.stats().await?;
        let dt = at.elapsed();
        let mut out = std::io::stdout().lock();
        // Clear the screen and go home, then draw the table.
        write!(
            out,
            "\x1b[2J\x1b[H{}  every {:.1}s, Ctrl-C to stop\n\n{}",
            args.target.url,
            interval.as_secs_f64(),
            table(&now, Some((&before, dt)))
        )?;
        out.flush()?;
        before = now;
        at = Instant::now();
        shown += 1;
        if args.count.is_some_and(|c| shown >= c) {
            break;
        }
    }
    queue.close().await?;
    Ok(())
}

pub async fn peek(args: PeekArgs) -> Result<()> {
    let queue = args.target.open().await?;
    let now = queue.clock().now();
    let messages = api::messages(&queue, &args.channel, args.limit).await?;
    if args.json {
        let doc = serde_json::json!({ "now": now, "messages": messages });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else if messages.is_empty() {
        println!("(no pending messages in {})", args.channel);
    }
    for m in messages.iter().filter(|_| !args.json) {
        println!(
            "{} {:?} attempts={} priority={} age={} {}",
            m.id,
            m.state,
            m.attempts,
            m.priority,
            age(m.age_ms),
            m.payload
        );
    }
    queue.close().await?;
    Ok(())
}

pub async fn dlq(command: Dlq) -> Result<()> {
    match command {
        Dlq::List {
            target,
            channel,
            limit,
            json,
        } => {
            let queue = target.open().await?;
            let dead = api::dead_letters(&queue, &channel, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dead)?);
            } else if dead.letters.is_empty() {
                println!("(no dead letters in {channel})");
            }
            for d in dead.letters.iter().filter(|_| !json) {
                println!(
                    "{} attempts={} error={:?} {}",
                    d.id, d.attempts, d.error, d.payload
                );
            }
            queue.close().await?;
        }
        Dlq::Redrive {
            target,
            channel,
            ids: chosen,
        } => {
            let queue = target.open().await?;
            let n = queue.redrive(&channel, ids(&chosen).as_deref()).await?;
            println!("redrove {n} message(s) into {channel}");
            queue.close().await?;
        }
        Dlq::Purge {
            target,
            channel,
            ids: chosen,
            yes,
        } => {
            if chosen.is_empty() && !yes {
                bail!(
                    "purging every dead letter of `{channel}` needs --yes (or name messages with --id)"
                );
            }
            let queue = target.open().await?;
            let n = queue.purge_dead(&channel, ids(&chosen).as_deref()).await?;
            println!("purged {n} dead letter(s) from {channel}");
            queue.close().await?;
        }
    }
    Ok(())
}

pub async fn set_paused(args: PauseArgs, paused: bool) -> Result<()> {
    let queue = args.target.open().await?;
    let channel = &args.channel;
    if paused {
        queue.pause(channel).await?;
        println!("paused {channel}: nothing is delivered until it is resumed");
    } else {
        queue.resume(channel).await?;
        println!("resumed {channel}");
    }
    queue.close().await?;
    Ok(())
}

pub async fn cancel(args: CancelArgs) -> Result<()> {
    let queue = args.target.open().await?;
    let (channel, id) = (&args.channel, args.id);
    match queue.cancel(channel, queue_core::MessageId(id)).await? {
        queue_core::Cancelled::Pending => println!("cancelled message {id} of {channel}"),
        queue_core::Cancelled::InFlight => println!(
            "cancelled message {id} of {channel}; it was in flight: its handler is told and its settle is refused"
        ),
    }
    queue.close().await?;
    Ok(())
}

pub async fn purge(args: PurgeArgs) -> Result<()> {
    let channel = &args.channel;
    if !args.yes {
        bail!("purging deletes every pending message of `{channel}`: pass --yes");
    }
    let queue = args.target.open().await?;
    let n = queue.purge(channel).await?;
    println!("purged {n} pending message(s) from {channel}");
    queue.close().await?;
    Ok(())
}

pub async fn produce(args: ProduceArgs) -> Result<()> {
    let value: serde_json::Value =
        serde_json::from_str(&args.json).context("--json is not valid JSON")?;
    let bson = bson::Bson::try_from(value).context("the JSON cannot be stored as BSON")?;
    let payload = codec::encode(&bson)?;
    let name: &'static str = Box::leak(args.channel.clone().into_boxed_str());
    let mut spec = ChannelSpec::new(name);
    if let Some(window) = args.dedup {
        spec = spec.exactly_once(window);
    }
    let out = Outgoing {
        dedup_key: args.dedup.map(|_| codec::dedup_key(&payload)),
        payload,
        delay: args.delay.unwrap_or_default(),
        priority: args.priority,
        group: None,
    };
    let queue = args.target.open().await?;
    let receipt = queue.produce_raw(&spec, vec![out]).await?;
    let r = receipt.first().context("no receipt")?;
    println!(
        "{} message {}{}",
        if r.duplicate {
            "duplicate of"
        } else {
            "produced"
        },
        r.id,
        if r.duplicate { " (dropped)" } else { "" }
    );
    queue.close().await?;
    Ok(())
}

/// `queuectl check --data DIR`: one line per damaged segment and per torn tail; fails if any
/// segment is damaged.
pub fn check(dir: &std::path::Path) -> Result<()> {
    use queue_runtime::adapters::file::Finding;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let findings = queue_runtime::adapters::file::check(dir)
        .with_context(|| format!("cannot scan {}", dir.display()))?;
    let mut damaged = 0;
    for finding in &findings {
        match finding {
            Finding::Damaged { path, damage } => {
                damaged += 1;
                println!(
                    "damaged: {} at offset {}: {}",
                    path.display(),
                    damage.offset,
                    damage.what
                );
            }
            Finding::TornTail {
                path,
                offset,
                bytes,
                what,
            } => println!(
                "torn tail (cut when opened): {} at offset {offset}, {bytes} bytes: {what}",
                path.display()
            ),
        }
    }
    if damaged > 0 {
        bail!("{damaged} damaged segment(s) in {}", dir.display());
    }
    println!("{}: no damage", dir.display());
    Ok(())
}
