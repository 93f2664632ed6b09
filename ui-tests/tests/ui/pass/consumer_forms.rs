//! The accepted consumer shapes: no return type, `-> ()`, and `Result<(), E>` through an
//! alias, each registered for its channel.

use queue_core::{channel, consumer, registry};
use serde::{Deserialize, Serialize};

#[channel("forms/ping")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ping;

type Outcome<T> = Result<T, std::io::Error>;

#[consumer]
async fn plain(_ping: Ping) {}

#[consumer]
#[allow(clippy::unused_unit)]
async fn unit(_ping: Ping) -> () {}

#[consumer(max_parallel = 1)]
async fn aliased(_ping: Ping) -> Outcome<()> {
    Ok(())
}

fn main() {
    let mut names: Vec<&str> = registry::consumers()
        .filter(|c| (c.spec)().name == "forms/ping")
        .map(|c| c.name)
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["aliased", "plain", "unit"]);
}
