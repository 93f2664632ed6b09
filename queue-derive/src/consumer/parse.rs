//! Parsing: the options and the function into [`Parsed`].

use proc_macro2::TokenStream;

use crate::common::{Arg, parse_args};

/// The attribute as written.
pub(super) struct Parsed {
    pub(super) args: Vec<Arg>,
    pub(super) item: syn::Item,
}

pub(super) fn parse(args: TokenStream, item: TokenStream) -> syn::Result<Parsed> {
    Ok(Parsed {
        args: parse_args(args)?,
        item: syn::parse2(item)?,
    })
}
