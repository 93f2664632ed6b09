//! Pieces both attributes use: error collection, option parsing, durations, crate paths.

use std::fmt::Display;
use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Ident, Lit, Token};

/// Collects errors so one compile shows every mistake.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, span: Span, message: impl Display) {
        self.push_error(syn::Error::new(span, message));
    }

    pub(crate) fn push_spanned(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push_error(syn::Error::new_spanned(tokens, message));
    }

    pub(crate) fn push_error(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(e) => e.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }

    /// How many errors were pushed.
    pub(crate) fn count(&self) -> usize {
        self.0.as_ref().map_or(0, |e| e.into_iter().count())
    }
}

/// One comma-separated argument of an attribute.
pub(crate) enum Arg {
    /// A literal: `"user/registered"`.
    Lit(Lit),
    /// A bare word: `exactly_once`.
    Flag(Ident),
    /// `key = value`.
    KeyValue { key: Ident, value: Expr },
    /// Anything else.
    Other(Expr),
}

pub(crate) fn parse_args(args: TokenStream) -> syn::Result<Vec<Arg>> {
    let exprs = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(args)?;
    Ok(exprs.into_iter().map(classify).collect())
}

fn single_ident(expr: &Expr) -> Option<Ident> {
    match expr {
        Expr::Path(p) if p.attrs.is_empty() && p.qself.is_none() => p.path.get_ident().cloned(),
        _ => None,
    }
}

fn classify(expr: Expr) -> Arg {
    match expr {
        Expr::Lit(l) if l.attrs.is_empty() => Arg::Lit(l.lit),
        Expr::Assign(a) => match single_ident(&a.left) {
            Some(key) => Arg::KeyValue {
                key,
                value: *a.right,
            },
            None => Arg::Other(Expr::Assign(a)),
        },
        other => match single_ident(&other) {
            Some(flag) => Arg::Flag(flag),
            None => Arg::Other(other),
        },
    }
}

/// The known name `name` is most likely a typo of, if any is close enough.
pub(crate) fn closest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (strsim::damerau_levenshtein(name, k), k))
        .min_by_key(|(d, _)| *d)
        .filter(|(d, _)| *d <= 2 || (*d <= 3 && name.len() > 6))
        .map(|(_, k)| k)
}

/// Names as code, comma-separated: "`a`, `b`".
pub(crate) fn code_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "unknown option `x`, did you mean `y`?" or the list of options.
pub(crate) fn unknown_option(name: &str, known: &[&str]) -> String {
    match closest(name, known.iter().copied()) {
        Some(k) => format!("unknown option `{name}`, did you mean `{k}`?"),
        None => format!(
            "unknown option `{name}`, expected one of {}",
            code_list(known.iter().copied())
        ),
    }
}

/// Parses a duration string such as `"500ms"`, `"1s"` or `"1h 30m"`.
pub(crate) fn parse_duration(
    value: &Expr,
    option: &str,
    errors: &mut Errors,
) -> Option<(Duration, Span)> {
    let Expr::Lit(syn::ExprLit {
        lit: Lit::Str(s), ..
    }) = value
    else {
        let message = match value {
            Expr::Lit(syn::ExprLit {
                lit: Lit::Int(i), ..
            }) => format!(
                "`{option}` must be a duration string, did you mean `{option} = \"{}s\"`?",
                i.base10_digits()
            ),
            _ => format!("`{option}` must be a duration string such as `\"30s\"` or `\"1h 30m\"`"),
        };
        errors.push_spanned(value, message);
        return None;
    };
    match duration_from_str(&s.value(), option) {
        Ok(d) if d.is_zero() => {
            errors.push(s.span(), format!("`{option}` must be longer than zero"));
            None
        }
        Ok(d) => Some((d, s.span())),
        Err(message) => {
            errors.push(s.span(), message);
            None
        }
    }
}

/// Reads a duration such as `"1s"` written for `option`; the error says what is wrong.
fn duration_from_str(text: &str, option: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| duration_error(text, option, &e))
}

/// Says what is wrong with a duration; humantime's own messages give byte offsets.
fn duration_error(text: &str, option: &str, e: &humantime::DurationError) -> String {
    use humantime::DurationError as E;
    let example = "such as `\"30s\"`, `\"500ms\"` or `\"1h 30m\"`";
    match e {
        E::Empty => format!("`{option}` must not be empty: give a duration {example}"),
        E::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            format!("duration `{text}` for `{option}` needs a unit, did you mean `\"{value}s\"`?")
        }
        E::UnknownUnit { unit, .. } => format!(
            "unknown unit `{unit}` in duration `{text}` for `{option}`, expected one of `ms`, `s`, `m`, `h`, `d`"
        ),
        E::NumberOverflow => format!("duration `{text}` for `{option}` is too large"),
        E::InvalidCharacter(_) | E::NumberExpected(_) => {
            format!(
                "invalid duration `{text}` for `{option}`: expected a number and a unit, {example}"
            )
        }
    }
}

/// Parses a rate such as `"100/1s"`: a count of at least 1 per a window of at least 1 ms.
pub(crate) fn parse_rate(
    value: &Expr,
    option: &str,
    errors: &mut Errors,
) -> Option<(u32, Duration)> {
    let example = format!("`{option} = \"100/1s\"`");
    let Expr::Lit(syn::ExprLit {
        lit: Lit::Str(s), ..
    }) = value
    else {
        errors.push_spanned(
            value,
            format!("`{option}` must be a string of a count and a window, such as {example}"),
        );
        return None;
    };
    let text = s.value();
    let Some((count, window)) = text.split_once('/') else {
        let message = match text.trim().parse::<u32>() {
            Ok(n) if n > 0 => format!(
                "rate `{text}` for `{option}` needs a window, did you mean `{option} = \"{n}/1s\"`?"
            ),
            _ => format!(
                "invalid rate `{text}` for `{option}`: expected a count, `/` and a window, such as {example}"
            ),
        };
        errors.push(s.span(), message);
        return None;
    };
    let (count, window) = (count.trim(), window.trim());
    let count = match count.parse::<u32>() {
        Ok(0) => {
            errors.push(
                s.span(),
                format!(
                    "rate `{text}` for `{option}` allows nothing: the count must be at least 1"
                ),
            );
            return None;
        }
        Ok(n) => n,
        Err(_) if !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit()) => {
            errors.push(
                s.span(),
                format!(
                    "the count in rate `{text}` for `{option}` is too large, the limit is {}",
                    u32::MAX
                ),
            );
            return None;
        }
        Err(_) => {
            errors.push(
                s.span(),
                format!(
                    "invalid rate `{text}` for `{option}`: the count before `/` must be a positive integer, such as {example}"
                ),
            );
            return None;
        }
    };
    if window.is_empty() {
        errors.push(
            s.span(),
            format!(
                "rate `{text}` for `{option}` needs a window after `/`, did you mean `{option} = \"{count}/1s\"`?"
            ),
        );
        return None;
    }
    match duration_from_str(window, option) {
        Ok(per) if per < Duration::from_millis(1) => {
            errors.push(
                s.span(),
                format!("the window of `{option}` must be at least 1ms, found `{window}`"),
            );
            None
        }
        Ok(per) => Some((count, per)),
        Err(message) => {
            errors.push(s.span(), message);
            None
        }
    }
}

/// Parses a positive integer literal.
pub(crate) fn parse_positive_int(value: &Expr, option: &str, errors: &mut Errors) -> Option<u32> {
    let Expr::Lit(syn::ExprLit {
        lit: Lit::Int(i), ..
    }) = value
    else {
        let message = match value {
            Expr::Lit(syn::ExprLit {
                lit: Lit::Str(s), ..
            }) if s.value().trim().parse::<u32>().is_ok_and(|n| n > 0) => format!(
                "`{option}` must be an integer, not a string, did you mean `{option} = {}`?",
                s.value().trim()
            ),
            _ => format!("`{option}` must be an integer literal such as `{option} = 5`"),
        };
        errors.push_spanned(value, message);
        return None;
    };
    match i.base10_parse::<u32>() {
        Ok(0) => {
            errors.push(i.span(), format!("`{option}` must be at least 1"));
            None
        }
        Ok(n) => Some(n),
        Err(_) => {
            errors.push(
                i.span(),
                format!("`{option}` must be an integer between 1 and {}", u32::MAX),
            );
            None
        }
    }
}

/// Parses a limit: a positive integer literal, where 0 gets `zero`'s explanation (such as
/// "omit it for no limit") rather than the bare range.
pub(crate) fn parse_limit(
    value: &Expr,
    option: &str,
    zero: &str,
    errors: &mut Errors,
) -> Option<u32> {
    if let Expr::Lit(syn::ExprLit {
        lit: Lit::Int(i), ..
    }) = value
        && i.base10_parse::<u32>().is_ok_and(|n| n == 0)
    {
        errors.push(i.span(), format!("`{option}` must be at least 1: {zero}"));
        return None;
    }
    parse_positive_int(value, option, errors)
}

/// The path to `queue_core` from the calling crate: `::queue_core`, or the copy re-exported
/// by `queue_runtime` when that is the only one the crate depends on.
pub(crate) fn core_path() -> TokenStream {
    use proc_macro_crate::{FoundCrate, crate_name};
    if let Ok(found) = crate_name("queue-core") {
        return match found {
            FoundCrate::Itself => quote!(::queue_core),
            FoundCrate::Name(name) => {
                let ident = Ident::new(&name, Span::call_site());
                quote!(::#ident)
            }
        };
    }
    if let Ok(FoundCrate::Name(name)) = crate_name("queue-runtime") {
        let ident = Ident::new(&name, Span::call_site());
        return quote!(::#ident::__core);
    }
    quote!(::queue_core)
}

/// The span of an item's keyword, for "applies to" errors.
pub(crate) fn keyword_span(item: &syn::Item) -> Span {
    match item {
        syn::Item::Fn(f) => f.sig.fn_token.span,
        syn::Item::Trait(t) => t.trait_token.span,
        syn::Item::Union(u) => u.union_token.span,
        syn::Item::Struct(s) => s.struct_token.span,
        syn::Item::Enum(e) => e.enum_token.span,
        syn::Item::Impl(i) => i.impl_token.span,
        syn::Item::Mod(m) => m.mod_token.span,
        syn::Item::Type(t) => t.type_token.span,
        syn::Item::Const(c) => c.const_token.span,
        syn::Item::Static(s) => s.static_token.span,
        syn::Item::Use(u) => u.use_token.span,
        other => other.span(),
    }
}

/// What an item is, in words.
pub(crate) fn item_kind(item: &syn::Item) -> &'static str {
    match item {
        syn::Item::Fn(_) => "a function",
        syn::Item::Trait(_) => "a trait",
        syn::Item::Union(_) => "a union",
        syn::Item::Struct(_) => "a struct",
        syn::Item::Enum(_) => "an enum",
        syn::Item::Impl(_) => "an impl block",
        syn::Item::Mod(_) => "a module",
        syn::Item::Type(_) => "a type alias",
        syn::Item::Const(_) => "a constant",
        syn::Item::Static(_) => "a static",
        _ => "this item",
    }
}

/// The user's item followed by the errors.
pub(crate) fn with_errors(item: TokenStream, error: &syn::Error) -> TokenStream {
    let errors = error.to_compile_error();
    quote!(#item #errors)
}
