use queue_core::channel;

#[channel("user/registered")]
fn user_registered() {}

fn main() {}
