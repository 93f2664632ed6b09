//! A refused name is one error: the type still gets its channel, so its uses compile.

use queue_core::{Channel, Queue, QueueError, channel};
use serde::{Deserialize, Serialize};

#[channel("user registered")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRegistered {
    pub id: u64,
}

async fn produce(queue: &Queue) -> Result<(), QueueError> {
    UserRegistered::produce(queue, UserRegistered { id: 1 }).await?;
    let _ = UserRegisteredChannel::SPEC.name;
    Ok(())
}

fn main() {
    let _ = produce;
}
