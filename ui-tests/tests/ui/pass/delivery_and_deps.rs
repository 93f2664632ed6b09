//! A consumer taking `Delivery<T>` and two `Dep<T>` dependencies and returning
//! `Result<(), E>`: the registry lists what it needs, in parameter order, and builds it only
//! once both are provided.

use std::any::{TypeId, type_name};
use std::fmt;

use queue_core::{Delivery, Dep, Deps, channel, consumer, registry};
use serde::{Deserialize, Serialize};

#[channel("mail/requested", max_attempts = 5)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailRequested {
    pub to: String,
}

pub struct Mailer {
    pub host: &'static str,
}

pub struct AuditLog;

#[derive(Debug)]
pub struct MailError(String);

impl fmt::Display for MailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mail failed: {}", self.0)
    }
}

#[consumer]
async fn send_mail(
    delivery: Delivery<MailRequested>,
    mailer: Dep<Mailer>,
    _audit: Dep<AuditLog>,
) -> Result<(), MailError> {
    if delivery.message().to.is_empty() {
        return Err(MailError(format!("no recipient via {}", mailer.host)));
    }
    Ok(())
}

fn main() {
    let decl = registry::consumers()
        .find(|c| c.name == "send_mail")
        .expect("the consumer is registered");
    assert_eq!((decl.spec)().name, "mail/requested");
    assert_eq!((decl.spec)().max_attempts, 5);
    assert!((decl.message_type)().ends_with("::MailRequested"));
    assert_eq!(decl.max_parallel, 0);

    let requirements = (decl.requirements)();
    let names: Vec<&str> = requirements.iter().map(|r| r.type_name).collect();
    assert_eq!(names, [type_name::<Mailer>(), type_name::<AuditLog>()]);
    assert_eq!(requirements[0].type_id, TypeId::of::<Mailer>());
    assert_eq!(requirements[1].type_id, TypeId::of::<AuditLog>());

    let mut deps = Deps::default();
    assert!((decl.build)(&deps).is_none());
    deps.insert(Mailer { host: "smtp" });
    assert!((decl.build)(&deps).is_none());
    deps.insert(AuditLog);
    assert!(requirements.iter().all(|r| deps.satisfies(r)));
    assert!((decl.build)(&deps).is_some());
}
