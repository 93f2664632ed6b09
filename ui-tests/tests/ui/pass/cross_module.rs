//! A channel declared in one module and consumed in another: the consumer is registered with
//! its module path, its function name and the channel it reads.

mod events {
    use queue_core::channel;
    use serde::{Deserialize, Serialize};

    #[channel("orders/placed", lease = "1m")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct OrderPlaced {
        pub order_id: u64,
    }
}

mod handlers {
    use queue_core::consumer;

    use crate::events::OrderPlaced;

    #[consumer(max_parallel = 4)]
    pub async fn ship(order: OrderPlaced) {
        let _ = order.order_id;
    }
}

use std::time::Duration;

use queue_core::{Channel, registry};

fn main() {
    assert_eq!(
        <events::OrderPlacedChannel as Channel>::SPEC.lease,
        Duration::from_secs(60)
    );

    let decl = registry::consumers()
        .find(|c| c.name == "ship")
        .expect("the consumer is registered");
    assert!(
        decl.module_path.ends_with("::handlers"),
        "{}",
        decl.module_path
    );
    assert!(decl.path().ends_with("::handlers::ship"), "{}", decl.path());
    assert_eq!(decl.max_parallel, 4);
    assert_eq!((decl.spec)(), events::OrderPlacedChannel::SPEC);
    assert!((decl.message_type)().ends_with("::events::OrderPlaced"));
    assert!((decl.requirements)().is_empty());
    assert!((decl.build)(&queue_core::Deps::default()).is_some());

    // Keeps `handlers::ship` referenced outside the registry too.
    let _future = handlers::ship(events::OrderPlaced { order_id: 1 });
}
