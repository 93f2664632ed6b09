//! Validation: named checks over [`Parsed`], each collecting its errors, producing
//! [`Valid`] for expansion.

use std::time::Duration;

use proc_macro2::Span;
use quote::ToTokens;
use syn::spanned::Spanned;
use syn::{Ident, Lit, Visibility};

use super::parse::{Opt, Parsed};
use crate::common::{
    Arg, Errors, item_kind, keyword_span, parse_duration, parse_positive_int, unknown_option,
};

const OPTIONS: &[&str] = &[
    "exactly_once",
    "at_least_once",
    "dedup",
    "lease",
    "max_attempts",
    "backoff",
];
const FLAGS: &[&str] = &["exactly_once", "at_least_once"];

/// A channel ready to expand.
pub(super) struct Valid {
    pub(super) name: String,
    pub(super) ident: Ident,
    pub(super) vis: Visibility,
    pub(super) item: syn::Item,
    pub(super) exactly_once: bool,
    pub(super) dedup: Option<Duration>,
    pub(super) lease: Option<Duration>,
    pub(super) max_attempts: Option<u32>,
    pub(super) backoff: Option<Duration>,
}

pub(super) fn validate(p: Parsed) -> syn::Result<Valid> {
    let mut errors = Errors::default();
    let name = check_name(&p, &mut errors);
    let target = check_item(&p.item, &mut errors);
    let opts = check_options(&p.options, &mut errors);
    errors.finish()?;
    let (ident, vis) = target.expect("checked");
    Ok(Valid {
        name: name.expect("checked"),
        ident,
        vis,
        item: p.item,
        exactly_once: opts.exactly_once,
        dedup: opts.dedup,
        lease: opts.lease,
        max_attempts: opts.max_attempts,
        backoff: opts.backoff,
    })
}

/// The name must be a non-empty string literal of `[A-Za-z0-9/._-]` without a leading or
/// trailing `/`: it is a key in stores, URLs and metrics, where other characters need escaping.
fn check_name(p: &Parsed, errors: &mut Errors) -> Option<String> {
    let lit = match &p.name {
        None => {
            errors.push(
                p.attr_span,
                "missing channel name: expected `#[channel(\"name\")]`",
            );
            return None;
        }
        Some(Arg::Lit(Lit::Str(s))) => s,
        Some(Arg::Flag(f)) => {
            errors.push(
                f.span(),
                format!("the channel name must come first as a string literal, found `{f}`"),
            );
            return None;
        }
        Some(Arg::KeyValue { key, .. }) => {
            errors.push(
                key.span(),
                format!(
                    "the channel name must come first as a string literal, found option `{key}`"
                ),
            );
            return None;
        }
        Some(Arg::Lit(other)) => {
            errors.push_spanned(other, "the channel name must be a string literal");
            return None;
        }
        Some(Arg::Other(e)) => {
            errors.push_spanned(
                e,
                "the channel name must be a string literal, not an expression",
            );
            return None;
        }
    };
    let name = lit.value();
    if name.is_empty() {
        errors.push(lit.span(), "the channel name must not be empty");
        return None;
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-')))
    {
        errors.push(
            lit.span(),
            format!(
                "channel name `{name}` contains {bad:?}; use letters, digits, `/`, `.`, `_` and `-`"
            ),
        );
        return None;
    }
    if name.starts_with('/') || name.ends_with('/') {
        errors.push(
            lit.span(),
            format!("channel name `{name}` must not start or end with `/`"),
        );
        return None;
    }
    Some(name)
}

/// Only a non-generic struct or enum can be a message: a channel carries one concrete type,
/// and only data types can be serialized.
fn check_item(item: &syn::Item, errors: &mut Errors) -> Option<(Ident, Visibility)> {
    let (ident, vis, generics) = match item {
        syn::Item::Struct(s) => (&s.ident, &s.vis, &s.generics),
        syn::Item::Enum(e) => (&e.ident, &e.vis, &e.generics),
        other => {
            errors.push(
                keyword_span(other),
                format!(
                    "`#[channel]` applies to a struct or an enum, not {}",
                    item_kind(other)
                ),
            );
            return None;
        }
    };
    if !generics.params.is_empty() {
        errors.push(
            generics.span(),
            format!(
                "channel message type `{ident}` cannot be generic: a channel carries one concrete type"
            ),
        );
        return None;
    }
    if generics.where_clause.is_some() {
        errors.push_spanned(
            generics.where_clause.to_token_stream(),
            format!("channel message type `{ident}` cannot have a `where` clause"),
        );
        return None;
    }
    Some((ident.clone(), vis.clone()))
}

#[derive(Default)]
struct Options {
    exactly_once: bool,
    dedup: Option<Duration>,
    lease: Option<Duration>,
    max_attempts: Option<u32>,
    backoff: Option<Duration>,
}

/// Every option is known, given once, flags take no value and values are well formed;
/// `exactly_once` and `at_least_once` exclude each other; `dedup` needs `exactly_once`.
fn check_options(opts: &[Opt], errors: &mut Errors) -> Options {
    let mut out = Options::default();
    let mut seen: Vec<(String, Span)> = Vec::new();
    let mut processing: Option<(Ident, Span)> = None;
    let mut dedup_span = None;
    for opt in opts {
        let (key, value) = match opt {
            Opt::Flag(k) => (k, None),
            Opt::Value(k, v) => (k, Some(v)),
            Opt::Stray(lit) => {
                errors.push_spanned(lit, "expected an option such as `exactly_once` or `lease = \"30s\"`, found a literal");
                continue;
            }
            Opt::Other(e) => {
                errors.push_spanned(
                    e,
                    "expected an option such as `exactly_once` or `lease = \"30s\"`",
                );
                continue;
            }
        };
        let name = key.to_string();
        if !OPTIONS.contains(&name.as_str()) {
            errors.push(key.span(), unknown_option(&name, OPTIONS));
            continue;
        }
        if seen.iter().any(|(n, _)| *n == name) {
            errors.push(key.span(), format!("duplicate option `{name}`"));
            continue;
        }
        seen.push((name.clone(), key.span()));
        let is_flag = FLAGS.contains(&name.as_str());
        match (is_flag, value) {
            (true, Some(v)) => {
                errors.push_spanned(v, format!("`{name}` takes no value"));
                continue;
            }
            (false, None) => {
                let example = if name == "max_attempts" {
                    "5"
                } else {
                    "\"30s\""
                };
                errors.push(
                    key.span(),
                    format!("`{name}` needs a value: `{name} = {example}`"),
                );
                continue;
            }
            _ => {}
        }
        match (name.as_str(), value) {
            ("exactly_once" | "at_least_once", None) => {
                if let Some((first, _)) = &processing {
                    errors.push(
                        key.span(),
                        format!("`{key}` conflicts with `{first}`: a channel is either `exactly_once` or `at_least_once`"),
                    );
                } else {
                    out.exactly_once = name == "exactly_once";
                    processing = Some((key.clone(), key.span()));
                }
            }
            ("dedup", Some(v)) => {
                dedup_span = Some(key.span());
                out.dedup = parse_duration(v, "dedup", errors).map(|(d, _)| d);
            }
            ("lease", Some(v)) => out.lease = parse_duration(v, "lease", errors).map(|(d, _)| d),
            ("backoff", Some(v)) => {
                out.backoff = parse_duration(v, "backoff", errors).map(|(d, _)| d)
            }
            ("max_attempts", Some(v)) => {
                out.max_attempts = parse_positive_int(v, "max_attempts", errors)
            }
            _ => unreachable!("every option is matched above"),
        }
    }
    if let Some(span) = dedup_span {
        if !out.exactly_once {
            errors.push(
                span,
                "`dedup` applies only to `exactly_once` channels: add `exactly_once` or remove `dedup`",
            );
        }
    }
    out
}
