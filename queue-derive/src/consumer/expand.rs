//! Expansion: the user's function unchanged, plus its registry entry.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;

use super::validate::Valid;
use crate::common::core_path;

pub(super) fn expand(v: &Valid) -> TokenStream {
    let krate = core_path();
    let p = quote!(#krate::__private);
    let func = &v.func;
    let fn_name = &func.sig.ident;
    let fn_name_str = fn_name.to_string();
    let message = &v.message;
    let max_parallel = v.max_parallel.unwrap_or(0);

    let input_check = quote_spanned! {message.span()=>
        const _: () = #p::assert_consumer_input::<#message>();
    };
    let dep_checks = v.deps.iter().map(|ty| {
        quote_spanned! {ty.span()=>
            const _: () = #p::assert_dependency::<#ty>();
        }
    });
    let output_check = v.output.as_ref().map(|ty| {
        quote_spanned! {ty.span()=>
            const _: () = #p::assert_output::<#ty>();
        }
    });

    let dep_idents: Vec<_> = (0..v.deps.len())
        .map(|i| format_ident!("__dep{}", i))
        .collect();
    let dep_types = &v.deps;
    let message_of = quote_spanned! {message.span()=>
        <#message as #p::ConsumerInput>::Message
    };

    quote! {
        #func

        #input_check
        #(#dep_checks)*
        #output_check

        const _: () = {
            fn __spec() -> #p::ChannelSpec {
                <<#message_of as #p::Message>::Channel as #p::Channel>::SPEC
            }

            fn __message_type() -> &'static str {
                #p::type_name::<#message_of>()
            }

            fn __requirements() -> #p::Vec<#p::Requirement> {
                #p::Vec::from([#(<#dep_types as #p::FromDeps>::requirement()),*])
            }

            fn __build(deps: &#p::Deps) -> #p::Option<#p::ErasedHandler> {
                #(let #dep_idents = <#dep_types as #p::FromDeps>::from_deps(deps)?;)*
                #p::Some(#p::ErasedHandler::new::<#message, _, _>(
                    move |message: #message| {
                        #fn_name(message, #(#p::Clone::clone(&#dep_idents)),*)
                    },
                ))
            }

            #p::inventory::submit! {
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
        };
    }
}
