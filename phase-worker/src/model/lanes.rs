//! The HTTP clients a worker's calls are spread over, each with its own
//! connection to the model server, filled in order rather than in turn.
//!
//! A server allows only so many concurrent streams on one HTTP/2 connection
//! (commonly 100 to 256) and makes the rest wait, so a worker allowed 20,000
//! calls in flight keeps 200 clients. Taking them in turn (round robin) had
//! every call open a connection of its own until all 200 were open: a worker
//! with 500 calls held 200 TLS connections, each with its buffers (about
//! 40 KB of h2 and rustls state), and made 200 handshakes with the provider.
//! Filled in order, a call goes to the first client with room for another
//! stream, so a worker holds as many connections as its calls need
//! (500 calls: 5), and a connection stays warm instead of going idle.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Concurrent calls one connection carries before the next is used, by
/// default: below what HTTP/2 servers commonly allow per connection.
pub const DEFAULT_STREAMS_PER_CONNECTION: usize = 100;

/// The clients and how many calls each carries now.
pub(super) struct Lanes {
    clients: Box<[reqwest::Client]>,
    open: Box<[AtomicUsize]>,
    streams_per_connection: usize,
}

/// One call's place on a client, given back when the call's response is done.
pub(super) struct Lease<'a> {
    pub(super) client: &'a reqwest::Client,
    open: &'a AtomicUsize,
}

impl Lanes {
    pub(super) fn new(clients: Vec<reqwest::Client>, streams_per_connection: usize) -> Self {
        let open = clients.iter().map(|_| AtomicUsize::new(0)).collect();
        Self {
            clients: clients.into(),
            open,
            streams_per_connection: streams_per_connection.max(1),
        }
    }

    /// A place for one more call: on the first client with room for another
    /// stream, or, when all are full, on the least busy (the server queues it).
    pub(super) fn lease(&self) -> Lease<'_> {
        let index = self.take_room().unwrap_or_else(|| {
            let index = self.least_busy();
            self.open[index].fetch_add(1, Ordering::Relaxed);
            index
        });
        Lease {
            client: &self.clients[index],
            open: &self.open[index],
        }
    }

    /// Takes a place on the first client with room, counted in the same
    /// step as the check, so two calls at once cannot both take its last one.
    fn take_room(&self) -> Option<usize> {
        let limit = self.streams_per_connection;
        self.open.iter().position(|open| {
            open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
                .is_ok()
        })
    }

    fn least_busy(&self) -> usize {
        (0..self.open.len())
            .min_by_key(|&index| self.open[index].load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(clients: usize, streams_per_connection: usize) -> Lanes {
        super::super::install_crypto_provider();
        Lanes::new(vec![reqwest::Client::new(); clients], streams_per_connection)
    }

    fn index_of(lanes: &Lanes, lease: &Lease<'_>) -> usize {
        lanes
            .open
            .iter()
            .position(|open| std::ptr::eq(open, lease.open))
            .unwrap()
    }

    #[test]
    fn calls_fill_the_first_client_before_the_next_is_used() {
        let lanes = lanes(4, 3);
        let leases: Vec<_> = (0..7).map(|_| lanes.lease()).collect();
        let used: Vec<usize> = leases.iter().map(|lease| index_of(&lanes, lease)).collect();
        assert_eq!(used, [0, 0, 0, 1, 1, 1, 2]);
    }

    #[test]
    fn a_finished_call_makes_room_on_its_client_again() {
        let lanes = lanes(2, 2);
        let first = lanes.lease();
        let _second = lanes.lease();
        drop(first);
        let third = lanes.lease();
        assert_eq!(index_of(&lanes, &third), 0, "the freed place on client 0 is reused");
        assert_eq!(index_of(&lanes, &lanes.lease()), 1);
    }

    #[test]
    fn when_every_client_is_full_the_least_busy_takes_the_call() {
        let lanes = lanes(2, 1);
        let _a = lanes.lease();
        let _b = lanes.lease();
        let _c = lanes.lease();
        assert_eq!(
            lanes.open.iter().map(|o| o.load(Ordering::Relaxed)).collect::<Vec<_>>(),
            [2, 1]
        );
        assert_eq!(index_of(&lanes, &lanes.lease()), 1);
    }
}
