//! Expansion: the marker type, the trait impls, the registry entry and the associated
//! functions, from [`Valid`] only.

use std::time::Duration;

use proc_macro2::{Group, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};

use super::validate::{Schedule, Valid};
use crate::common::core_path;

fn duration(krate: &TokenStream, d: Duration) -> TokenStream {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    quote!(#krate::__private::Duration::new(#secs, #nanos))
}

/// `tokens` with every span set to `span`, so an error about an expression built from them
/// points at `span` alone rather than from the attribute's start to `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|tt| match tt {
            TokenTree::Group(g) => {
                let mut group = Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                TokenTree::Group(group)
            }
            mut other => {
                other.set_span(span);
                other
            }
        })
        .collect()
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
    if let Some(n) = v.concurrency {
        spec = quote!(#spec.concurrency(#n));
    }
    if let Some(n) = v.concurrency_per_group {
        spec = quote!(#spec.concurrency_per_group(#n));
    }
    if let Some((limit, per)) = v.rate {
        let per = duration(&krate, per);
        spec = quote!(#spec.rate(#limit, #per));
    }
    if let Some((limit, per)) = v.rate_per_group {
        let per = duration(&krate, per);
        spec = quote!(#spec.rate_per_group(#limit, #per));
    }
    // Last: a schedule sets the processing and dedup window of its own.
    match &v.schedule {
        Some((Schedule::Every(period), _)) => {
            let period = duration(&krate, *period);
            spec = quote!(#spec.every(#period));
        }
        Some((Schedule::Cron { expr, longest_gap }, _)) => {
            let gap = duration(&krate, *longest_gap);
            spec = quote!(#spec.cron(#expr, #gap));
        }
        None => {}
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
    // The field's `GroupKey` bound is proven here, in the one place it is used, at the field's
    // name in the attribute (with the macro's hygiene), so a field such as `f64` is one error
    // there.
    let group = v.group.as_ref().map(|field| {
        let span = Span::call_site().located_at(field.span());
        let at = respan(p.clone(), span);
        let hash = quote_spanned!(span=> #at::GroupKey::group_hash(&self.#field));
        quote! {
            fn group(&self) -> #p::Option<::core::primitive::u64> {
                #p::Some(#hash)
            }
        }
    });
    // Likewise `Default` for a periodic channel, at its `every` or `cron` option.
    let for_slot = v.schedule.as_ref().map(|(_, option)| {
        let span = Span::call_site().located_at(*option);
        let at = respan(p.clone(), span);
        let message = quote_spanned!(span=> #at::periodic_default::<Self>());
        quote! {
            fn for_slot(_slot: ::core::primitive::u64) -> #p::Option<Self> {
                #p::Some(#message)
            }
        }
    });
    // At the type's name, so rustc's "the trait `Message` is implemented for …" hints point
    // at the declaration rather than at the attribute.
    let message_impl = quote_spanned! {ident.span()=>
        impl #p::Message for #ident where #payload {
            type Channel = #marker;
            #group
            #for_slot
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
