//! One typo is one error: no follow-on error about `dedup`, and none at the use sites.

use queue_core::{Channel, Queue, QueueError, channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("user/registered", exactly_onse, dedup = "1s")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRegistered {
    pub id: u64,
}

#[consumer]
async fn welcome(user: UserRegistered) -> Result<(), std::io::Error> {
    let _ = user.id;
    Ok(())
}

async fn produce(queue: &Queue) -> Result<(), QueueError> {
    UserRegistered::produce(queue, UserRegistered { id: 1 }).await?;
    UserRegistered::producer(queue)
        .produce(UserRegistered { id: 2 })
        .await?;
    let _ = UserRegisteredChannel::SPEC.name;
    Ok(())
}

fn main() {
    let _ = produce;
}
