//! Validation: named checks over the consumer function, collecting every mistake.

use quote::ToTokens;
use syn::{FnArg, GenericArgument, PathArguments, ReturnType, Type};

use super::parse::Parsed;
use crate::common::{Arg, Errors, item_kind, keyword_span, parse_positive_int, unknown_option};

const OPTIONS: &[&str] = &["max_parallel"];

/// A consumer ready to expand.
pub(super) struct Valid {
    pub(super) func: syn::ItemFn,
    pub(super) message: Type,
    pub(super) deps: Vec<Type>,
    pub(super) output: Option<Type>,
    pub(super) max_parallel: Option<u32>,
}

pub(super) fn validate(p: Parsed) -> syn::Result<Valid> {
    let mut errors = Errors::default();
    let max_parallel = check_options(&p.args, &mut errors);
    let syn::Item::Fn(func) = p.item else {
        errors.push(
            keyword_span(&p.item),
            format!(
                "`#[consumer]` applies to an `async fn`, not {}",
                item_kind(&p.item)
            ),
        );
        return Err(errors.finish().expect_err("an error was pushed"));
    };
    check_async(&func, &mut errors);
    check_generics(&func, &mut errors);
    let params = check_params(&func, &mut errors);
    let output = check_output(&func, &mut errors);
    errors.finish()?;
    let (message, deps) = params.expect("checked");
    Ok(Valid {
        func,
        message,
        deps,
        output,
        max_parallel,
    })
}

/// `max_parallel = N` with N ≥ 1 is the only option.
fn check_options(args: &[Arg], errors: &mut Errors) -> Option<u32> {
    let mut max_parallel = None;
    let mut seen = false;
    for arg in args {
        match arg {
            Arg::KeyValue { key, value } if key == "max_parallel" => {
                if seen {
                    errors.push(key.span(), "duplicate option `max_parallel`");
                    continue;
                }
                seen = true;
                max_parallel = parse_positive_int(value, "max_parallel", errors);
            }
            Arg::Flag(key) if key == "max_parallel" => {
                errors.push(
                    key.span(),
                    "`max_parallel` needs a value: `max_parallel = 4`",
                );
            }
            Arg::KeyValue { key, .. } | Arg::Flag(key) => {
                errors.push(key.span(), unknown_option(&key.to_string(), OPTIONS));
            }
            Arg::Lit(l) => errors.push_spanned(l, "expected `max_parallel = N`, found a literal"),
            Arg::Other(e) => errors.push_spanned(e, "expected `max_parallel = N`"),
        }
    }
    max_parallel
}

/// Handlers run on the worker's async runtime, so the function must be `async`.
fn check_async(func: &syn::ItemFn, errors: &mut Errors) {
    if func.sig.asyncness.is_none() {
        errors.push(
            func.sig.fn_token.span,
            format!("consumer `{}` must be an `async fn`", func.sig.ident),
        );
    }
}

/// A consumer is registered once for one message type, so it cannot be generic.
fn check_generics(func: &syn::ItemFn, errors: &mut Errors) {
    if !func.sig.generics.params.is_empty() {
        errors.push_spanned(
            &func.sig.generics.params,
            format!(
                "consumer `{}` cannot be generic: it is registered for one concrete message type",
                func.sig.ident
            ),
        );
    }
}

/// The first parameter is the message; the rest are dependencies. No `self`: a worker calls
/// consumers as free functions. No `impl Trait`: like generics, it has no one concrete type.
fn check_params(func: &syn::ItemFn, errors: &mut Errors) -> Option<(Type, Vec<Type>)> {
    let mut types = Vec::new();
    let mut ok = true;
    for input in &func.sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                errors.push(
                    r.self_token.span,
                    format!(
                        "consumer `{}` cannot take `self`: declare it as a free function",
                        func.sig.ident
                    ),
                );
                ok = false;
            }
            FnArg::Typed(t) if matches!(*t.ty, Type::ImplTrait(_)) => {
                errors.push_spanned(
                    &t.ty,
                    format!(
                        "consumer `{}` cannot take `impl Trait`: it is registered for one concrete message type",
                        func.sig.ident
                    ),
                );
                ok = false;
            }
            FnArg::Typed(t) => types.push((*t.ty).clone()),
        }
    }
    if func.sig.inputs.is_empty() {
        errors.push(
            func.sig.paren_token.span.join(),
            format!(
                "consumer `{}` takes no message: its first parameter must be a `#[channel]` type",
                func.sig.ident
            ),
        );
        return None;
    }
    if !ok {
        return None;
    }
    let mut types = types.into_iter();
    let message = types.next()?;
    Some((message, types.collect()))
}

/// `()`, nothing, or `Result<(), E>`; anything else would have no meaning for ack or retry.
/// Only shapes that can never be either are rejected here: any other path may be an alias
/// (`anyhow::Result<()>`, `fmt::Result`, `type Handled = Result<(), MyError>`), so it is left to
/// the `HandlerOutput` bound, which rustc checks with the type resolved.
fn check_output(func: &syn::ItemFn, errors: &mut Errors) -> Option<Type> {
    let ReturnType::Type(_, ty) = &func.sig.output else {
        return None;
    };
    if never_an_output(ty) {
        errors.push_spanned(
            ty.to_token_stream(),
            format!(
                "consumer `{}` must return `()` or `Result<(), E>`, not `{}`",
                func.sig.ident,
                ty.to_token_stream()
                    .to_string()
                    .replace(" < ", "<")
                    .replace("< ", "<")
                    .replace(" >", ">")
                    .replace(" ,", ",")
                    .replace("& ", "&")
            ),
        );
    }
    Some((**ty).clone())
}

/// A tuple other than `()`, a `Result` whose success type is not `()`, or a type that is not
/// a path at all (a reference, `impl Trait`, an array…).
fn never_an_output(ty: &Type) -> bool {
    match ty {
        Type::Tuple(t) => !t.elems.is_empty(),
        Type::Paren(p) => never_an_output(&p.elem),
        Type::Group(g) => never_an_output(&g.elem),
        Type::Path(p) => p.qself.is_none() && p.path.segments.last().is_some_and(|seg| {
            seg.ident == "Result"
                && match &seg.arguments {
                    PathArguments::AngleBracketed(a) => matches!(
                        a.args.first(),
                        Some(GenericArgument::Type(t)) if !matches!(t, Type::Tuple(t) if t.elems.is_empty())
                    ),
                    _ => false,
                }
        }),
        Type::Macro(_) | Type::Verbatim(_) => false,
        _ => true,
    }
}
