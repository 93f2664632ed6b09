//! `#[channel("name", options…)]`.

mod expand;
mod parse;
mod schedule;
mod validate;

use proc_macro2::TokenStream;

use crate::common::with_errors;

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let parsed = match parse::parse(args, item.clone()) {
        Ok(p) => p,
        Err(e) => return with_errors(item, &e),
    };
    match validate::validate(parsed) {
        (Some(valid), Ok(())) => expand::expand(&valid),
        (Some(valid), Err(e)) => {
            let mut out = expand::expand(&valid);
            out.extend(e.to_compile_error());
            out
        }
        (None, Err(e)) => with_errors(item, &e),
        (None, Ok(())) => unreachable!("an item that cannot expand is an error"),
    }
}
