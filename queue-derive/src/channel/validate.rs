//! Validation: named checks over [`Parsed`], each collecting its errors, producing
//! [`Valid`] for expansion.

use std::time::Duration;

use proc_macro2::Span;
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Expr, Ident, Lit, Visibility};

use super::parse::{Opt, Parsed};
use super::schedule;
use crate::common::{
    Arg, Errors, closest, code_list, item_kind, keyword_span, parse_duration, parse_limit,
    parse_positive_int, parse_rate, unknown_option,
};

const OPTIONS: &[&str] = &[
    "exactly_once",
    "at_least_once",
    "dedup",
    "lease",
    "max_attempts",
    "backoff",
    "group",
    "concurrency",
    "concurrency_per_group",
    "rate",
    "rate_per_group",
    "every",
    "cron",
];
const FLAGS: &[&str] = &["exactly_once", "at_least_once"];

/// The shortest period of `every`.
const MIN_EVERY: Duration = Duration::from_secs(1);

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
    /// The field whose value is the message's group, spanned where the attribute names it.
    pub(super) group: Option<Ident>,
    pub(super) concurrency: Option<u32>,
    pub(super) concurrency_per_group: Option<u32>,
    pub(super) rate: Option<(u32, Duration)>,
    pub(super) rate_per_group: Option<(u32, Duration)>,
    /// The schedule of a periodic channel, with the span of its option.
    pub(super) schedule: Option<(Schedule, Span)>,
}

/// When a periodic channel fires.
pub(super) enum Schedule {
    /// `every = "1h"`
    Every(Duration),
    /// `cron = "0 0 * * *"`, with the longest time between two of its slots.
    Cron { expr: String, longest_gap: Duration },
}

/// The channel to expand and the errors found. With errors, the channel is still expanded
/// when its item is a usable type (a placeholder name and the options that were understood),
/// as serde does, so that one mistake is one error rather than one more at every use site.
pub(super) fn validate(p: Parsed) -> (Option<Valid>, syn::Result<()>) {
    let mut errors = Errors::default();
    let (name, options) = split_name(p.name, p.options);
    let name = check_name(name, p.attr_span, &mut errors);
    let target = check_item(&p.item, &mut errors);
    let opts = check_options(&options, &p.item, &mut errors);
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
        group: opts.group,
        concurrency: opts.concurrency,
        concurrency_per_group: opts.concurrency_per_group,
        rate: opts.rate,
        rate_per_group: opts.rate_per_group,
        schedule: opts.schedule,
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
    group: Option<Ident>,
    concurrency: Option<u32>,
    concurrency_per_group: Option<u32>,
    rate: Option<(u32, Duration)>,
    rate_per_group: Option<(u32, Duration)>,
    schedule: Option<(Schedule, Span)>,
}

/// Where each option that takes part in a check across options was written.
#[derive(Default)]
struct Spans {
    /// `exactly_once` or `at_least_once`, whichever was given.
    processing: Option<(Ident, Span)>,
    dedup: Option<Span>,
    group: Option<Span>,
    concurrency_per_group: Option<Span>,
    /// `every` or `cron`, whichever was given first.
    schedule: Option<(Ident, Span)>,
}

/// Every option is known, given once, flags take no value and values are well formed; then
/// the checks across options ([`check_combinations`]).
fn check_options(opts: &[Opt], item: &syn::Item, errors: &mut Errors) -> Options {
    let mut out = Options::default();
    let mut seen: Vec<(String, Span)> = Vec::new();
    let mut spans = Spans::default();
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
        let value = match (is_flag, value) {
            (true, Some(v)) => {
                errors.push_spanned(v, format!("`{name}` takes no value: write `{name}` alone"));
                continue;
            }
            (false, None) => {
                let example = example_value(&name);
                errors.push(
                    key.span(),
                    format!("`{name}` needs a value: `{name} = {example}`"),
                );
                continue;
            }
            (_, value) => value,
        };
        let Some(v) = value else {
            // `exactly_once` or `at_least_once`.
            if let Some((first, _)) = &spans.processing {
                errors.push(
                    key.span(),
                    format!("`{key}` conflicts with `{first}`: a channel is either `exactly_once` or `at_least_once`"),
                );
            } else {
                out.exactly_once = name == "exactly_once";
                spans.processing = Some((key.clone(), key.span()));
            }
            continue;
        };
        match name.as_str() {
            "dedup" => {
                spans.dedup = Some(key.span());
                out.dedup = parse_duration(v, "dedup", errors).map(|(d, _)| d);
            }
            "lease" => out.lease = parse_duration(v, "lease", errors).map(|(d, _)| d),
            "backoff" => out.backoff = parse_duration(v, "backoff", errors).map(|(d, _)| d),
            "max_attempts" => out.max_attempts = parse_positive_int(v, "max_attempts", errors),
            "group" => {
                spans.group = Some(key.span());
                out.group = group_field(key, v, item, errors);
            }
            "concurrency" => {
                out.concurrency = parse_limit(v, "concurrency", "omit it for no limit", errors);
            }
            "concurrency_per_group" => {
                spans.concurrency_per_group = Some(v.span());
                out.concurrency_per_group = parse_limit(
                    v,
                    "concurrency_per_group",
                    "the default, 1, keeps each group in produce order",
                    errors,
                );
            }
            "rate" => out.rate = parse_rate(v, "rate", errors),
            "rate_per_group" => out.rate_per_group = parse_rate(v, "rate_per_group", errors),
            "every" | "cron" => {
                if let Some((first, _)) = &spans.schedule {
                    errors.push(
                        key.span(),
                        format!(
                            "`{key}` conflicts with `{first}`: a periodic channel has one schedule, either `every` or `cron`"
                        ),
                    );
                    continue;
                }
                spans.schedule = Some((key.clone(), key.span()));
                let schedule = if name == "every" {
                    every(v, errors)
                } else {
                    cron(v, errors)
                };
                out.schedule = schedule.map(|s| (s, key.span()));
            }
            _ => unreachable!("every option is matched above"),
        }
    }
    // Checks across options only when each option was understood: `exactly_onse` with
    // `dedup` is one typo, not also a `dedup` without `exactly_once`.
    if errors.count() == before {
        check_combinations(&mut out, &spans, errors);
    }
    out
}

/// A value to show in "`option` needs a value" errors.
fn example_value(option: &str) -> &'static str {
    match option {
        "max_attempts" => "5",
        "concurrency" | "concurrency_per_group" => "4",
        "rate" | "rate_per_group" => "\"100/1s\"",
        "group" => "customer_id",
        "every" => "\"1h\"",
        "cron" => "\"0 0 * * *\"",
        _ => "\"30s\"",
    }
}

/// The options that exclude each other, each conflict one error; the option in conflict is
/// dropped, so that the channel still expands with the rest.
///
/// - A periodic channel (`every` or `cron`) is exactly once with its own dedup window, the
///   longest gap between its slots, so `dedup` and `at_least_once` contradict it; it produces
///   one message per slot, so a `group` has nothing to order.
/// - `dedup` needs `exactly_once`: an at-least-once channel keeps every produce.
/// - `concurrency_per_group` above `concurrency` can never be reached.
fn check_combinations(out: &mut Options, spans: &Spans, errors: &mut Errors) {
    if let Some((schedule, _)) = &spans.schedule {
        if let Some(span) = spans.dedup {
            errors.push(
                span,
                format!(
                    "`dedup` does not apply to a periodic channel: `{schedule}` deduplicates on each slot's time, over the longest gap between slots"
                ),
            );
            out.dedup = None;
        }
        if let Some((processing, span)) = &spans.processing
            && processing == "at_least_once"
        {
            errors.push(
                *span,
                format!(
                    "`at_least_once` conflicts with `{schedule}`: a periodic channel is exactly once, one message per slot"
                ),
            );
        }
        if let Some(span) = spans.group {
            errors.push(
                span,
                format!(
                    "`group` does not apply to a periodic channel: `{schedule}` produces one message per slot, so there is nothing to order"
                ),
            );
            out.group = None;
        }
    } else if let Some(span) = spans.dedup
        && !out.exactly_once
    {
        errors.push(
            span,
            "`dedup` applies only to `exactly_once` channels: add `exactly_once` or remove `dedup`",
        );
    }
    if let (Some(all), Some(per_group), Some(span)) = (
        out.concurrency,
        out.concurrency_per_group,
        spans.concurrency_per_group,
    ) && per_group > all
    {
        errors.push(
            span,
            format!(
                "`concurrency_per_group = {per_group}` can never be reached: `concurrency = {all}` allows at most {all} in flight across all groups"
            ),
        );
        out.concurrency_per_group = None;
    }
}

/// `group` names a field of the message struct by its identifier: the field's value is read
/// from every message at produce time, so it must be a named field of a struct.
fn group_field(key: &Ident, value: &Expr, item: &syn::Item, errors: &mut Errors) -> Option<Ident> {
    let example = "such as `group = customer_id`";
    let field = match value {
        Expr::Path(p)
            if p.attrs.is_empty() && p.qself.is_none() && p.path.get_ident().is_some() =>
        {
            p.path.get_ident().cloned()?
        }
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(s), ..
        }) => {
            let message = match syn::parse_str::<Ident>(&s.value()) {
                Ok(ident) => format!(
                    "`group` takes a field name, not a string, did you mean `group = {ident}`?"
                ),
                Err(_) => format!("`group` takes a field name, not a string, {example}"),
            };
            errors.push(s.span(), message);
            return None;
        }
        other => {
            errors.push_spanned(
                other,
                format!("`group` takes the name of a field, {example}"),
            );
            return None;
        }
    };
    let (ident, fields) = match item {
        syn::Item::Struct(s) => (&s.ident, &s.fields),
        syn::Item::Enum(e) => {
            errors.push(
                key.span(),
                format!(
                    "`group` names a field of a struct, and `{}` is an enum: group its messages with `.group(key)` on its producer instead",
                    e.ident
                ),
            );
            return None;
        }
        // `check_item` says what the item should be.
        _ => return None,
    };
    let named = match fields {
        syn::Fields::Named(named) => named,
        syn::Fields::Unnamed(_) => {
            errors.push(
                key.span(),
                format!(
                    "`group` names a field of a struct with named fields, and `{ident}` is a tuple struct"
                ),
            );
            return None;
        }
        syn::Fields::Unit => {
            errors.push(
                key.span(),
                format!("`group` names a field of a struct, and `{ident}` has no fields"),
            );
            return None;
        }
    };
    let names: Vec<String> = named
        .named
        .iter()
        .filter_map(|f| f.ident.as_ref().map(|i| i.unraw().to_string()))
        .collect();
    let wanted = field.unraw().to_string();
    if names.contains(&wanted) {
        return Some(field);
    }
    let message = match closest(&wanted, names.iter().map(String::as_str)) {
        Some(close) => format!("no field `{wanted}` on `{ident}`, did you mean `{close}`?"),
        None if names.is_empty() => format!("no field `{wanted}` on `{ident}`, it has no fields"),
        None => format!(
            "no field `{wanted}` on `{ident}`, its fields are {}",
            code_list(names.iter().map(String::as_str))
        ),
    };
    errors.push(field.span(), message);
    None
}

/// `every` is a period of at least [`MIN_EVERY`]: each slot costs a durable produce and a
/// delayed delivery, which a faster schedule would spend on nothing but ticking.
fn every(value: &Expr, errors: &mut Errors) -> Option<Schedule> {
    let (period, span) = parse_duration(value, "every", errors)?;
    if period < MIN_EVERY {
        errors.push(
            span,
            format!(
                "`every = {}` is too short: a periodic channel fires at most once a second",
                value.to_token_stream()
            ),
        );
        return None;
    }
    Some(Schedule::Every(period))
}

/// `cron` is a string the run time can read (five fields, or six with seconds first) that
/// fires at least twice; its longest gap between slots becomes the dedup window, so it is
/// computed here, from a fixed instant, for reproducible builds.
fn cron(value: &Expr, errors: &mut Errors) -> Option<Schedule> {
    let Expr::Lit(syn::ExprLit {
        lit: Lit::Str(s), ..
    }) = value
    else {
        errors.push_spanned(
            value,
            "`cron` must be a string such as `cron = \"0 0 * * *\"` (minute, hour, day of month, month, weekday, in UTC)",
        );
        return None;
    };
    let expr = s.value();
    if expr.trim().is_empty() {
        errors.push(
            s.span(),
            "`cron` must not be empty: give an expression such as `\"0 0 * * *\"`",
        );
        return None;
    }
    let parsed = match schedule::parse_cron(&expr) {
        Ok(c) => c,
        Err(e) => {
            errors.push(
                s.span(),
                format!("invalid cron expression `{expr}`: {}", schedule::quiet(&e)),
            );
            return None;
        }
    };
    let Some(longest_gap) = schedule::longest_gap(&parsed) else {
        errors.push(
            s.span(),
            format!("cron expression `{expr}` never fires twice: a periodic channel needs a repeating schedule"),
        );
        return None;
    };
    Some(Schedule::Cron { expr, longest_gap })
}
