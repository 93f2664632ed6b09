//! Parsing: attribute arguments and the item into [`Parsed`], keeping spans.

use proc_macro2::{Span, TokenStream};
use syn::{Expr, Ident, Lit};

use crate::common::{Arg, parse_args};

/// The attribute as written.
pub(super) struct Parsed {
    /// The first argument, if any.
    pub(super) name: Option<Arg>,
    /// The remaining arguments.
    pub(super) options: Vec<Opt>,
    /// The item the attribute is on.
    pub(super) item: syn::Item,
    /// The attribute's own span, for errors about what is missing.
    pub(super) attr_span: Span,
}

/// One option after the name.
pub(super) enum Opt {
    /// `exactly_once`
    Flag(Ident),
    /// `dedup = "1s"`
    Value(Ident, Expr),
    /// A literal where an option should be.
    Stray(Lit),
    /// Anything else.
    Other(Expr),
}

pub(super) fn parse(args: TokenStream, item: TokenStream) -> syn::Result<Parsed> {
    let item: syn::Item = syn::parse2(item)?;
    let mut args = parse_args(args)?.into_iter();
    let name = args.next();
    let options = args
        .map(|a| match a {
            Arg::Flag(f) => Opt::Flag(f),
            Arg::KeyValue { key, value } => Opt::Value(key, value),
            Arg::Lit(l) => Opt::Stray(l),
            Arg::Other(e) => Opt::Other(e),
        })
        .collect();
    Ok(Parsed {
        name,
        options,
        item,
        attr_span: Span::call_site(),
    })
}
