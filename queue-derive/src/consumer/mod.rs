//! `#[consumer]` and `#[consumer(max_parallel = N)]`.

mod expand;
mod parse;
mod validate;

use proc_macro2::TokenStream;

use crate::common::with_errors;

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let parsed = match parse::parse(args, item.clone()) {
        Ok(p) => p,
        Err(e) => return with_errors(item, &e),
    };
    match validate::validate(parsed) {
        Ok(valid) => expand::expand(&valid),
        Err(e) => with_errors(item, &e),
    }
}
