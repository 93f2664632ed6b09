//! The registry of channels and consumers linked into a binary, and dependency injection.
//!
//! `#[channel]` and `#[consumer]` submit a [`ChannelDecl`] or [`ConsumerDecl`] through
//! `inventory`; a worker reads them with [`channels`] and [`consumers`], so no hand-kept list
//! of consumers exists.

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::consume::ErasedHandler;
use crate::spec::ChannelSpec;

/// A channel declared with `#[channel]` somewhere in the binary.
#[derive(Debug)]
pub struct ChannelDecl {
    /// The channel's settings.
    pub spec: fn() -> ChannelSpec,
    /// The message type's name.
    pub message_type: fn() -> &'static str,
}

/// A consumer declared with `#[consumer]` somewhere in the binary.
#[derive(Debug)]
pub struct ConsumerDecl {
    /// The function's name.
    pub name: &'static str,
    /// The module it is declared in.
    pub module_path: &'static str,
    /// Its `max_parallel`, or 0 for the default.
    pub max_parallel: u32,
    /// The channel it consumes.
    pub spec: fn() -> ChannelSpec,
    /// The message type's name.
    pub message_type: fn() -> &'static str,
    /// The dependencies it takes, in parameter order.
    pub requirements: fn() -> Vec<Requirement>,
    /// Builds the handler from provided dependencies; `None` when one is missing.
    pub build: fn(&Deps) -> Option<ErasedHandler>,
}

impl ConsumerDecl {
    /// `module::function`.
    pub fn path(&self) -> String {
        format!("{}::{}", self.module_path, self.name)
    }
}

inventory::collect!(ChannelDecl);
inventory::collect!(ConsumerDecl);

/// Every channel declared in the binary.
pub fn channels() -> impl Iterator<Item = &'static ChannelDecl> {
    inventory::iter::<ChannelDecl>.into_iter()
}

/// Every consumer declared in the binary.
pub fn consumers() -> impl Iterator<Item = &'static ConsumerDecl> {
    inventory::iter::<ConsumerDecl>.into_iter()
}

/// A channel name declared on more than one message type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameClash {
    /// The channel name.
    pub channel: String,
    /// Every type that declares it.
    pub types: Vec<&'static str>,
}

impl fmt::Display for NameClash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "channel `{}` is declared on more than one type: {}",
            self.channel,
            self.types
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Channel names declared on more than one type among `decls`.
pub fn name_clashes<'a>(decls: impl IntoIterator<Item = &'a ChannelDecl>) -> Vec<NameClash> {
    let mut by_name: HashMap<String, Vec<&'static str>> = HashMap::new();
    for d in decls {
        let types = by_name.entry((d.spec)().name.into_owned()).or_default();
        let t = (d.message_type)();
        if !types.contains(&t) {
            types.push(t);
        }
    }
    let mut clashes: Vec<NameClash> = by_name
        .into_iter()
        .filter(|(_, t)| t.len() > 1)
        .map(|(channel, mut types)| {
            types.sort_unstable();
            NameClash { channel, types }
        })
        .collect();
    clashes.sort_by(|a, b| a.channel.cmp(&b.channel));
    clashes
}

/// A shared dependency handed to consumers: a cheap clone of an `Arc<T>`.
pub struct Dep<T: ?Sized>(Arc<T>);

impl<T: ?Sized> Dep<T> {
    /// Wraps a shared value.
    pub fn new(value: Arc<T>) -> Self {
        Dep(value)
    }

    /// The shared `Arc`.
    pub fn arc(&self) -> &Arc<T> {
        &self.0
    }
}

impl<T: ?Sized> Clone for Dep<T> {
    fn clone(&self) -> Self {
        Dep(self.0.clone())
    }
}

impl<T: ?Sized> Deref for Dep<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Dep<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A dependency a consumer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Requirement {
    /// The type's id.
    pub type_id: TypeId,
    /// The type's name, for error messages.
    pub type_name: &'static str,
}

/// Values provided to a worker, by type.
#[derive(Default)]
pub struct Deps {
    values: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Deps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deps")
            .field("count", &self.values.len())
            .finish()
    }
}

impl Deps {
    /// Provides a value; a later value of the same type replaces it.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.insert_arc(Arc::new(value));
    }

    /// Provides a shared value.
    pub fn insert_arc<T: Send + Sync + 'static>(&mut self, value: Arc<T>) {
        self.values.insert(TypeId::of::<T>(), value);
    }

    /// Whether a value of the required type is present.
    pub fn satisfies(&self, r: &Requirement) -> bool {
        self.values.contains_key(&r.type_id)
    }

    /// The value of type `T`.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.values
            .get(&TypeId::of::<T>())
            .and_then(|v| v.clone().downcast::<T>().ok())
    }
}

/// A consumer parameter after the message: something the worker provides.
#[diagnostic::on_unimplemented(
    message = "consumer parameter of type `{Self}` cannot be provided by a worker",
    label = "not a dependency",
    note = "take shared services as `Dep<T>` and provide them with `Worker::provide`"
)]
pub trait FromDeps: Clone + Send + Sync + Sized + 'static {
    /// What must be provided.
    fn requirement() -> Requirement;
    /// Takes it from the provided values.
    fn from_deps(deps: &Deps) -> Option<Self>;
}

impl<T: Send + Sync + 'static> FromDeps for Dep<T> {
    fn requirement() -> Requirement {
        Requirement {
            type_id: TypeId::of::<T>(),
            type_name: type_name::<T>(),
        }
    }

    fn from_deps(deps: &Deps) -> Option<Self> {
        deps.get::<T>().map(Dep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mailer(&'static str);

    #[test]
    fn a_provided_value_is_found_by_its_type() {
        let mut deps = Deps::default();
        assert!(<Dep<Mailer> as FromDeps>::from_deps(&deps).is_none());
        assert!(!deps.satisfies(&<Dep<Mailer>>::requirement()));
        deps.insert(Mailer("smtp"));
        let m = <Dep<Mailer>>::from_deps(&deps).expect("provided");
        assert_eq!((*m).0, "smtp");
        assert!(deps.satisfies(&<Dep<Mailer>>::requirement()));
        assert!(<Dep<String> as FromDeps>::from_deps(&deps).is_none());
    }

    fn spec_a() -> ChannelSpec {
        ChannelSpec::new("a")
    }
    fn spec_b() -> ChannelSpec {
        ChannelSpec::new("b")
    }

    #[test]
    fn two_types_on_one_name_are_reported_with_both_types() {
        let decls = [
            ChannelDecl {
                spec: spec_a,
                message_type: || "x::One",
            },
            ChannelDecl {
                spec: spec_a,
                message_type: || "y::Two",
            },
            ChannelDecl {
                spec: spec_b,
                message_type: || "z::Three",
            },
        ];
        let clashes = name_clashes(&decls);
        assert_eq!(clashes.len(), 1);
        assert_eq!(clashes[0].types, vec!["x::One", "y::Two"]);
        assert_eq!(
            clashes[0].to_string(),
            "channel `a` is declared on more than one type: `x::One`, `y::Two`"
        );
    }
}
