//! Errors of the queue API.

use std::time::Duration;

use crate::adapter::MessageId;

/// Everything a queue operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The message could not be encoded as BSON.
    #[error("cannot encode message as bson: {0}")]
    Encode(String),
    /// The payload is not BSON of the expected type.
    #[error("cannot decode message: {0}")]
    Decode(String),
    /// The encoded payload is larger than the queue accepts.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// The encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An ack, nack or extension carried a fencing token that no longer holds the message:
    /// its lease lapsed or it was settled already.
    #[error("lease on message {id} is no longer held (stale fencing token)")]
    StaleLease {
        /// The message the lease was for.
        id: MessageId,
    },
    /// The message was cancelled (`Queue::cancel`) while it was delivered: its settle and
    /// lease extensions are refused.
    #[error("message {id} was cancelled")]
    Cancelled {
        /// The message.
        id: MessageId,
    },
    /// No channel of that name is known to the queue.
    #[error("unknown channel `{0}`")]
    UnknownChannel(String),
    /// No message of that id is where the operation looked for it.
    #[error("no message {id} in `{channel}`")]
    UnknownMessage {
        /// The channel searched.
        channel: String,
        /// The id searched for.
        id: MessageId,
    },
    /// An option that the channel's settings forbid, such as a dedup key on an
    /// `at_least_once` channel.
    #[error("{0}")]
    InvalidRequest(String),
    /// The queue or the connection was closed.
    #[error("the queue is closed")]
    Closed,
    /// The durable store saw an fsync or write failure and refuses further writes; reopen it
    /// after fixing the disk.
    #[error("the store is poisoned after a failed write and refuses further writes: {0}")]
    Poisoned(String),
    /// An I/O error of the store or the connection.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The store's files are damaged.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The queue URL is not understood.
    #[error("invalid queue url `{url}`: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The adapter does not support the operation.
    #[error("operation not supported by this adapter: {0}")]
    Unsupported(&'static str),
    /// The peer broke the protocol or refused the request.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused the credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A backend error with its cause.
    #[error("{context}")]
    Backend {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl QueueError {
    /// A stable, lowercase name of the variant, as the broker protocol carries it
    /// (`stale_lease`, `unknown_channel`, …).
    pub fn code(&self) -> &'static str {
        match self {
            QueueError::Encode(_) => "encode",
            QueueError::Decode(_) => "decode",
            QueueError::PayloadTooLarge { .. } => "payload_too_large",
            QueueError::StaleLease { .. } => "stale_lease",
            QueueError::Cancelled { .. } => "cancelled",
            QueueError::UnknownChannel(_) => "unknown_channel",
            QueueError::UnknownMessage { .. } => "unknown_message",
            QueueError::InvalidRequest(_) => "invalid",
            QueueError::Closed => "closed",
            QueueError::Poisoned(_) => "poisoned",
            QueueError::Io(_) => "io",
            QueueError::Corrupt(_) => "corrupt",
            QueueError::InvalidUrl { .. } => "invalid_url",
            QueueError::Unsupported(_) => "unsupported",
            QueueError::Protocol(_) => "protocol",
            QueueError::Unauthorized(_) => "unauthorized",
            QueueError::Timeout(_) => "timeout",
            QueueError::Backend { .. } => "backend",
        }
    }

    /// Wraps a backend error with what was being done.
    pub fn backend(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        QueueError::Backend {
            context: context.into(),
            source: source.into(),
        }
    }
}
