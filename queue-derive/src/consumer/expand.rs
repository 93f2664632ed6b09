//! Expansion: the user's function unchanged, plus its registry entry.
//!
//! The parameter and return types are checked against `ConsumerInput`, `FromDeps` and
//! `HandlerOutput` so that one wrong type is one error, at that type. The registry entry is
//! built by a chain of `const fn` gates: gate `k` assumes the first `k` bounds through its
//! `where` clause and proves bound `k` twice, with `assert_*` (whose note names the check) and
//! by calling gate `k + 1`; both obligations cover exactly the type's tokens, so rustc reports
//! them once. The last gate builds the entry with every bound assumed, and the helpers it points
//! to assume every bound too, so their bodies never repeat an error. The bounds are
//! higher-ranked (`for<'__a>`) because rustc rejects a plain `where Type: Trait` that does not
//! hold as a trivially false bound.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::Type;

use super::validate::Valid;
use crate::common::core_path;

/// One bound on a type the user wrote, proven by one gate.
struct Bound<'a> {
    ty: &'a Type,
    /// The `__private` function whose bound is the check.
    assert: &'static str,
    /// The `__private` trait.
    bound: &'static str,
}

pub(super) fn expand(v: &Valid) -> TokenStream {
    let krate = core_path();
    let p = quote!(#krate::__private);
    let func = &v.func;
    let fn_name = &func.sig.ident;
    let fn_name_str = fn_name.to_string();
    let message = &v.message;
    let max_parallel = v.max_parallel.unwrap_or(0);

    let mut bounds = vec![Bound {
        ty: message,
        assert: "assert_consumer_input",
        bound: "ConsumerInput",
    }];
    bounds.extend(v.deps.iter().map(|ty| Bound {
        ty,
        assert: "assert_dependency",
        bound: "FromDeps",
    }));
    if let Some(ty) = &v.output {
        bounds.push(Bound {
            ty,
            assert: "assert_output",
            bound: "HandlerOutput",
        });
    }
    let assumed: Vec<TokenStream> = bounds
        .iter()
        .map(|b| {
            let (ty, bound) = (b.ty, format_ident!("{}", b.bound));
            quote!(for<'__a> #ty: #p::#bound)
        })
        .collect();

    let gate = |k: usize| format_ident!("__gate{}", k);
    let gates = bounds.iter().enumerate().map(|(k, b)| {
        let this = gate(k);
        let before = &assumed[..k];
        let (ty, assert) = (b.ty, format_ident!("{}", b.assert));
        // `__gateN::<>` starts on the type's first token and ends on its last: the span rustc
        // gives the `assert_*` error after narrowing it to the type argument.
        let (first, last) = outer_spans(ty);
        let mut next = gate(k + 1);
        next.set_span(first);
        let close = quote_spanned!(last=> >());
        quote! {
            const fn #this() -> #p::ConsumerDecl
            where
                #(#before,)*
            {
                #p::#assert::<#ty>();
                #next::<#close
            }
        }
    });
    let last = gate(bounds.len());
    let first = gate(0);

    let dep_idents: Vec<_> = (0..v.deps.len())
        .map(|i| format_ident!("__dep{}", i))
        .collect();
    let dep_types = &v.deps;
    // At the function's name: a future that is not `Send` is reported there.
    let handler = quote_spanned! {fn_name.span()=>
        #p::ErasedHandler::new::<#message, _, _>(
            move |message: #message| {
                #fn_name(message, #(#p::Clone::clone(&#dep_idents)),*)
            },
        )
    };

    quote! {
        #func

        const _: () = {
            #(#gates)*

            const fn #last() -> #p::ConsumerDecl
            where
                #(#assumed,)*
            {
                #p::ConsumerDecl {
                    name: #fn_name_str,
                    module_path: ::core::module_path!(),
                    max_parallel: #max_parallel,
                    spec: __spec,
                    message_type: __message_type,
                    requirements: __requirements,
                    build: __build,
                }
            }

            fn __spec() -> #p::ChannelSpec where #(#assumed,)* {
                <<<#message as #p::ConsumerInput>::Message as #p::Message>::Channel as #p::Channel>::SPEC
            }

            fn __message_type() -> &'static str where #(#assumed,)* {
                #p::type_name::<<#message as #p::ConsumerInput>::Message>()
            }

            fn __requirements() -> #p::Vec<#p::Requirement> where #(#assumed,)* {
                #p::Vec::from([#(<#dep_types as #p::FromDeps>::requirement()),*])
            }

            fn __build(deps: &#p::Deps) -> #p::Option<#p::ErasedHandler> where #(#assumed,)* {
                #(let #dep_idents = <#dep_types as #p::FromDeps>::from_deps(deps)?;)*
                #p::Some(#handler)
            }

            #p::inventory::submit! {
                #first()
            }
        };
    }
}

/// The spans of a type's first and last tokens.
fn outer_spans(ty: &Type) -> (Span, Span) {
    let mut tokens = ty.to_token_stream().into_iter();
    let first = tokens.next().map_or_else(Span::call_site, |t| t.span());
    let last = tokens.last().map_or(first, |t| t.span());
    (first, last)
}
