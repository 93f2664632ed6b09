use queue_core::channel;

#[channel("user/registered")]
trait UserRegistered {}

fn main() {}
