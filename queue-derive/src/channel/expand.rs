//! Expansion: the marker type, the trait impls, the registry entry and the associated
//! functions, from [`Valid`] only.

use std::time::Duration;

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};

use super::validate::Valid;
use crate::common::core_path;

fn duration(krate: &TokenStream, d: Duration) -> TokenStream {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    quote!(#krate::__private::Duration::new(#secs, #nanos))
}

pub(super) fn expand(v: &Valid) -> TokenStream {
    let krate = core_path();
    let p = quote!(#krate::__private);
    let ident = &v.ident;
    let vis = &v.vis;
    let item = &v.item;
    let marker = format_ident!("{}Channel", ident);
    let name = &v.name;

    let mut spec = quote!(#p::ChannelSpec::new(#name));
    if v.exactly_once {
        let window = duration(&krate, v.dedup.unwrap_or(Duration::from_secs(300)));
        spec = quote!(#spec.exactly_once(#window));
    }
    if let Some(d) = v.lease {
        let d = duration(&krate, d);
        spec = quote!(#spec.lease(#d));
    }
    if let Some(n) = v.max_attempts {
        spec = quote!(#spec.max_attempts(#n));
    }
    if let Some(d) = v.backoff {
        let d = duration(&krate, d);
        spec = quote!(#spec.backoff(#d));
    }

    let marker_doc = format!("The channel `{name}`, carrying [`{ident}`].");
    // The only place the message type's serde and thread-safety bounds are proven, at its
    // name. Everything below assumes them through a higher-ranked `where` clause (rustc
    // rejects a plain `where Type: Trait` that does not hold as a trivially false bound, but
    // not one under `for<'__a>`), so a type without `Serialize` gets this one error instead of
    // one more per impl and method.
    let payload_check = quote_spanned! {ident.span()=>
        const _: () = #p::assert_payload::<#ident>();
    };
    let payload = quote!(for<'__a> #ident: #p::ChannelPayload);
    // At the type's name, so rustc's "the trait `Message` is implemented for …" hints point
    // at the declaration rather than at the attribute.
    let message_impl = quote_spanned! {ident.span()=>
        impl #p::Message for #ident where #payload {
            type Channel = #marker;
        }
    };

    quote! {
        #item

        #[doc = #marker_doc]
        #[derive(
            ::core::clone::Clone,
            ::core::marker::Copy,
            ::core::fmt::Debug,
            ::core::default::Default,
            ::core::cmp::PartialEq,
            ::core::cmp::Eq,
            ::core::hash::Hash
        )]
        #vis struct #marker;

        const _: () = {
            #payload_check

            impl #p::Channel for #marker where #payload {
                type Message = #ident;
                const SPEC: #p::ChannelSpec = #spec;
            }

            #message_impl

            fn __spec() -> #p::ChannelSpec {
                #spec
            }

            fn __message_type() -> &'static str {
                #p::type_name::<#ident>()
            }

            #p::inventory::submit! {
                #p::ChannelDecl {
                    spec: __spec,
                    message_type: __message_type,
                }
            }

            #[allow(dead_code)]
            impl #ident {
                /// Produces a message on this type's channel; returns once it is durable.
                ///
                /// # Errors
                /// Encoding errors and the queue's errors.
                #vis async fn produce(
                    queue: &#p::Queue,
                    message: Self,
                ) -> #p::Result<#p::Receipt, #p::QueueError>
                where
                    #payload,
                {
                    queue.produce::<#marker>(message).await
                }

                /// A producer for this type's channel, with delay, priority, dedup key and
                /// batches.
                #vis fn producer(queue: &#p::Queue) -> #p::Producer<#marker>
                where
                    #payload,
                {
                    queue.producer::<#marker>()
                }

                /// Consumes this type's channel with `handler` until the returned handle is
                /// stopped or dropped. `Ok` (or `()`) acks; `Err` or a panic retries.
                ///
                /// # Errors
                /// The queue's error when the subscription cannot be opened.
                #vis async fn consume<F, Fut>(
                    queue: &#p::Queue,
                    handler: F,
                ) -> #p::Result<#p::ConsumerHandle, #p::QueueError>
                where
                    #payload,
                    F: ::core::ops::Fn(Self) -> Fut + #p::Send + #p::Sync + 'static,
                    Fut: #p::Future + #p::Send + 'static,
                    Fut::Output: #p::HandlerOutput,
                {
                    queue.consumer::<#marker>().handle(handler).await
                }

                /// A consumer builder for this type's channel.
                #vis fn consumer(queue: &#p::Queue) -> #p::ConsumerBuilder<#marker>
                where
                    #payload,
                {
                    queue.consumer::<#marker>()
                }

                /// Produces a message inside a transaction (the PostgreSQL adapter's): it is
                /// stored when the transaction commits and never if it rolls back.
                ///
                /// # Errors
                /// Encoding errors and the transaction's errors.
                #vis async fn produce_in<__Tx>(
                    tx: &__Tx,
                    message: Self,
                ) -> #p::Result<#p::Receipt, #p::QueueError>
                where
                    #payload,
                    __Tx: #p::TransactionalProduce + ?::core::marker::Sized,
                {
                    #p::produce_in::<#marker, __Tx>(tx, message).await
                }
            }
        };
    }
}
