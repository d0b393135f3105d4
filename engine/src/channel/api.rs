//! The messages of the backend HTTP API between shards (`crate::http::api` sends and handles them).
//!
//! A request reaches the shards that hold what it is about — the channel's home for publish, presence and
//! history; every shard (or the one shard of a client id) for disconnect and the channel list — and each of
//! them answers the shard of the HTTP connection with one part of the response. The answer names a
//! [`Ticket`]: an entry of that shard's table of pending API requests, with a generation, so an answer for a
//! request whose connection has gone (and whose entry was freed or reused) is recognised and dropped.

use std::sync::Arc;

use bytes::Bytes;

use super::Refusal;
use crate::conn::ConnKey;

/// Where an API answer goes: an entry of a shard's table of pending API requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The shard of the HTTP connection.
    pub shard: u16,
    /// The entry in its table.
    pub slot: u32,
    /// The entry's generation.
    pub gen: u32,
}

/// One message to publish: its index in the request (for the answer), the channel and the raw JSON data.
pub type PublishItem = (u32, Box<str>, Bytes);

/// The offset and epoch a published message got at its home, or why the home refused it.
pub type Published = Result<(u64, u64), Refusal>;

/// A backend API request to a shard, or a part of its answer.
#[derive(Debug)]
pub enum ApiMsg {
    /// -> a home: publish these messages (the request's messages homed there, in request order).
    Publish {
        /// Whom to answer.
        ticket: Ticket,
        /// When the request arrived ([`crate::metrics::stamp`]), for the delivery latency.
        born: u64,
        /// The messages.
        items: Vec<PublishItem>,
    },
    /// Home -> the API shard: what became of each message of a [`ApiMsg::Publish`].
    Published {
        /// The request.
        ticket: Ticket,
        /// (index in the request, offset and epoch or refusal), in request order.
        results: Vec<(u32, Published)>,
    },
    /// -> a home: the presence of a channel.
    Presence {
        /// Whom to answer.
        ticket: Ticket,
        /// The channel.
        channel: Box<str>,
    },
    /// -> a home: the history of a channel.
    History {
        /// Whom to answer.
        ticket: Ticket,
        /// The channel.
        channel: Box<str>,
        /// Only what follows this position (offset, epoch).
        since: Option<(u64, Box<str>)>,
        /// At most this many messages.
        limit: u32,
    },
    /// Home -> the API shard: a JSON object answering [`ApiMsg::Presence`] or [`ApiMsg::History`].
    Json {
        /// The request.
        ticket: Ticket,
        /// The object.
        body: Bytes,
    },
    /// -> every shard (a user) or one (a client id): close those WebSocket connections.
    Disconnect {
        /// Whom to answer.
        ticket: Ticket,
        /// Every connection of this user...
        user: Option<Box<str>>,
        /// ... or this one connection of the receiving shard.
        client: Option<ConnKey>,
        /// (To the relay) `client` lives on another node: (that node, the shard there).
        remote: Option<(Box<str>, u16)>,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: Box<str>,
    },
    /// A shard -> the API shard: connections it closed for a [`ApiMsg::Disconnect`].
    Disconnected {
        /// The request.
        ticket: Ticket,
        /// How many.
        count: u64,
    },
    /// -> every shard: its channels with subscribers, named after `after`, at most `limit`.
    Channels {
        /// Whom to answer.
        ticket: Ticket,
        /// The page starts after this name ("" from the start).
        after: Box<str>,
        /// Most channels.
        limit: u32,
    },
    /// The relay -> the API shard: a presence or history request failed (Redis unavailable): 503.
    Failed {
        /// The request.
        ticket: Ticket,
        /// Why.
        refusal: Refusal,
    },
    /// A shard -> the API shard: (channel, subscribers on that shard), the first names after the cursor.
    ChannelList {
        /// The request.
        ticket: Ticket,
        /// The channels, in name order.
        list: Vec<(Arc<str>, u64)>,
    },
}

impl ApiMsg {
    /// True for requests (refused when the destination's ring and overflow queue are full, like client
    /// requests), false for answers (always queued: their number is bounded by the requests).
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            ApiMsg::Publish { .. }
                | ApiMsg::Presence { .. }
                | ApiMsg::History { .. }
                | ApiMsg::Disconnect { .. }
                | ApiMsg::Channels { .. }
        )
    }

    /// The ticket the message is about.
    pub fn ticket(&self) -> Ticket {
        match self {
            ApiMsg::Publish { ticket, .. }
            | ApiMsg::Published { ticket, .. }
            | ApiMsg::Presence { ticket, .. }
            | ApiMsg::History { ticket, .. }
            | ApiMsg::Json { ticket, .. }
            | ApiMsg::Failed { ticket, .. }
            | ApiMsg::Disconnect { ticket, .. }
            | ApiMsg::Disconnected { ticket, .. }
            | ApiMsg::Channels { ticket, .. }
            | ApiMsg::ChannelList { ticket, .. } => *ticket,
        }
    }

    /// Bytes the message carries besides its own size (for the rings' byte bound).
    pub fn carried(&self) -> usize {
        const ITEM: usize = std::mem::size_of::<PublishItem>();
        match self {
            ApiMsg::Publish { items, .. } => items.iter().map(|(_, c, d)| ITEM + c.len() + d.len()).sum(),
            ApiMsg::Published { results, .. } => results.len() * std::mem::size_of::<(u32, Published)>(),
            ApiMsg::Presence { channel, .. } => channel.len(),
            ApiMsg::History { channel, since, .. } => channel.len() + since.as_ref().map_or(0, |(_, e)| e.len()),
            ApiMsg::Json { body, .. } => body.len(),
            ApiMsg::Disconnect { user, reason, remote, .. } => {
                user.as_ref().map_or(0, |u| u.len()) + reason.len() + remote.as_ref().map_or(0, |(n, _)| n.len())
            }
            ApiMsg::Disconnected { .. } | ApiMsg::Failed { .. } => 0,
            ApiMsg::Channels { after, .. } => after.len(),
            ApiMsg::ChannelList { list, .. } => list.iter().map(|(c, _)| c.len() + 24).sum(),
        }
    }
}
