//! Validation: named checks over [`Parsed`], each collecting its errors, producing
//! [`Valid`] for expansion.

use std::time::Duration;

use proc_macro2::Span;
use quote::ToTokens;
use syn::{Expr, Ident, Lit, Visibility};

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

/// The channel to expand and the errors found. With errors, the channel is still expanded
/// when its item is a usable type (a placeholder name and the options that were understood),
/// as serde does, so that one mistake is one error rather than one more at every use site.
pub(super) fn validate(p: Parsed) -> (Option<Valid>, syn::Result<()>) {
    let mut errors = Errors::default();
    let (name, options) = split_name(p.name, p.options);
    let name = check_name(name, p.attr_span, &mut errors);
    let target = check_item(&p.item, &mut errors);
    let opts = check_options(&options, &mut errors);
    let valid = target.map(|(ident, vis)| Valid {
        name: name.unwrap_or_else(|| PLACEHOLDER_NAME.to_string()),
        ident,
        vis,
        item: p.item,
        exactly_once: opts.exactly_once,
        dedup: opts.dedup,
        lease: opts.lease,
        max_attempts: opts.max_attempts,
        backoff: opts.backoff,
    });
    (valid, errors.finish())
}

/// The name a channel is expanded with when its own name was refused.
const PLACEHOLDER_NAME: &str = "invalid-channel-name";

/// Where the channel name is, once options written before it are recognised as options.
enum Name {
    /// The first argument, as the user wrote it.
    First(Arg),
    /// A string literal after options: `#[channel(lease = "1s", "name")]`.
    Late(syn::LitStr),
    /// No string literal anywhere; the first option, if any.
    Missing(Option<Ident>),
}

/// An option where the name belongs is an option, so it is still checked, and the name is
/// looked for after it: the mistake is the order (or a missing name), not the option.
fn split_name(first: Option<Arg>, mut options: Vec<Opt>) -> (Name, Vec<Opt>) {
    let (key, leading) = match first {
        None => return (Name::Missing(None), options),
        Some(Arg::KeyValue { key, value }) => (key.clone(), Opt::Value(key, value)),
        Some(Arg::Flag(f)) if OPTIONS.contains(&f.to_string().as_str()) => {
            (f.clone(), Opt::Flag(f))
        }
        Some(other) => return (Name::First(other), options),
    };
    let late = options
        .iter()
        .position(|o| matches!(o, Opt::Stray(Lit::Str(_))));
    let name = match late.map(|i| options.remove(i)) {
        Some(Opt::Stray(Lit::Str(s))) => Name::Late(s),
        _ => Name::Missing(Some(key)),
    };
    options.insert(0, leading);
    (name, options)
}

/// The longest channel name in bytes: `queue_core::limits::MAX_CHANNEL_NAME`, which every
/// adapter enforces at run time (this crate cannot depend on `queue-core`).
const MAX_NAME: usize = 255;

/// The name must be a non-empty string literal of at most [`MAX_NAME`] bytes of
/// `[A-Za-z0-9/._:-]` without a leading or trailing `/`: it is a key in stores, URLs and
/// metrics, where other characters need escaping, and it is stored with every message.
fn check_name(name: Name, attr_span: Span, errors: &mut Errors) -> Option<String> {
    let lit = match name {
        Name::First(Arg::Lit(Lit::Str(s))) => s,
        Name::Late(s) => {
            errors.push(
                s.span(),
                format!(
                    "the channel name must be the first argument: `#[channel({}, …)]`",
                    s.to_token_stream()
                ),
            );
            return None;
        }
        Name::Missing(None) => {
            errors.push(
                attr_span,
                "missing channel name: expected `#[channel(\"name\")]`",
            );
            return None;
        }
        Name::Missing(Some(option)) => {
            errors.push(
                option.span(),
                format!(
                    "missing channel name before `{option}`: expected `#[channel(\"name\", …)]`"
                ),
            );
            return None;
        }
        Name::First(Arg::Flag(f)) => {
            errors.push(
                f.span(),
                format!("the channel name must be a string literal, found `{f}`"),
            );
            return None;
        }
        Name::First(Arg::Lit(other)) => {
            errors.push_spanned(
                &other,
                format!(
                    "the channel name must be a string literal, found `{}`",
                    other.to_token_stream()
                ),
            );
            return None;
        }
        Name::First(Arg::Other(e)) => {
            let found = match &e {
                Expr::Path(path) => format!("`{}`", path.to_token_stream()).replace(" :: ", "::"),
                Expr::Macro(_) => "a macro call".to_string(),
                _ => "an expression".to_string(),
            };
            errors.push_spanned(
                &e,
                format!("the channel name must be a string literal, found {found}"),
            );
            return None;
        }
        Name::First(Arg::KeyValue { .. }) => unreachable!("split_name takes options out"),
    };
    let name = lit.value();
    if name.is_empty() {
        errors.push(lit.span(), "the channel name must not be empty");
        return None;
    }
    if name.len() > MAX_NAME {
        errors.push(
            lit.span(),
            format!(
                "channel name is {} bytes long, the limit is {MAX_NAME} bytes",
                name.len()
            ),
        );
        return None;
    }
    if let Some(bad) = name.chars().find(|c| !valid_name_char(*c)) {
        let suggestion = if name
            .chars()
            .all(|c| valid_name_char(c) || matches!(c, ' ' | '\t' | '\\'))
        {
            let fixed: String = name
                .trim()
                .chars()
                .map(|c| match c {
                    '\\' => '/',
                    ' ' | '\t' => '-',
                    c => c,
                })
                .collect();
            format!(", did you mean `{fixed}`?")
        } else {
            String::new()
        };
        errors.push(
            lit.span(),
            format!(
                "channel name `{name}` contains {bad:?}: use only letters, digits, `/`, `.`, `_`, `:` and `-`{suggestion}"
            ),
        );
        return None;
    }
    let (leading, trailing) = (name.starts_with('/'), name.ends_with('/'));
    if leading || trailing {
        let place = match (leading, trailing) {
            (true, true) => "start or end",
            (true, false) => "start",
            _ => "end",
        };
        let trimmed = name.trim_matches('/');
        let suggestion = if trimmed.is_empty() {
            String::new()
        } else {
            format!(", did you mean `{trimmed}`?")
        };
        errors.push(
            lit.span(),
            format!("channel name `{name}` must not {place} with `/`{suggestion}"),
        );
        return None;
    }
    Some(name)
}

fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | ':' | '-')
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
    if let Some(lifetime) = generics.lifetimes().next() {
        errors.push_spanned(
            lifetime,
            format!(
                "channel message type `{ident}` cannot borrow: messages are decoded into owned values"
            ),
        );
        return None;
    }
    if !generics.params.is_empty() {
        errors.push_spanned(
            &generics.params,
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
    let before = errors.count();
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
                errors.push_spanned(v, format!("`{name}` takes no value: write `{name}` alone"));
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
    // Checks across options only when each option was understood: `exactly_onse` with
    // `dedup` is one typo, not also a `dedup` without `exactly_once`.
    if let Some(span) = dedup_span
        && !out.exactly_once
        && errors.count() == before
    {
        errors.push(
            span,
            "`dedup` applies only to `exactly_once` channels: add `exactly_once` or remove `dedup`",
        );
    }
    out
}
