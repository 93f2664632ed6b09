//! A periodic channel's type without `Default` is one error, at the schedule, and the
//! channel's uses still compile.

use queue_core::{Channel, Message, Queue, QueueError, channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("reports/daily", every = "1d")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DailyReport {
    pub region: String,
}

#[consumer]
async fn report(message: DailyReport) -> Result<(), std::io::Error> {
    let _ = message.region;
    Ok(())
}

async fn produce(queue: &Queue) -> Result<(), QueueError> {
    let _ = DailyReport::for_slot(0);
    DailyReport::produce(
        queue,
        DailyReport {
            region: "eu".into(),
        },
    )
    .await?;
    let _ = DailyReportChannel::SPEC.schedule;
    Ok(())
}

fn main() {
    let _ = produce;
}
