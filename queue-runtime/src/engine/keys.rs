//! [`KeyWindow`]: keys remembered until a time on the queue clock, with a cap. It holds the
//! dedup windows of `exactly_once` channels, the keys of idempotent produces, and the broker's
//! cache of answered produce requests.

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

use queue_core::clock::Timestamp;

/// Keys with values, each forgotten once the clock reaches its window end, or, beyond `cap`
/// keys, the one whose window ends first.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(bound(
    serialize = "K: serde::Serialize, V: serde::Serialize",
    deserialize = "K: serde::Deserialize<'de> + Hash + Eq + Ord, V: serde::Deserialize<'de>"
))]
pub struct KeyWindow<K, V> {
    cap: usize,
    by_key: HashMap<K, (V, Timestamp)>,
    /// `(window end, key)`, for forgetting in order.
    order: BTreeSet<(Timestamp, K)>,
}

impl<K: Hash + Eq + Ord + Clone, V> KeyWindow<K, V> {
    /// An empty window holding at most `cap` keys.
    pub fn new(cap: usize) -> Self {
        KeyWindow {
            cap: cap.max(1),
            by_key: HashMap::new(),
            order: BTreeSet::new(),
        }
    }

    /// The value of `key` if its window has not ended at `now`.
    pub fn get<Q>(&self, key: &Q, now: Timestamp) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entry(key, now).map(|(v, _)| v)
    }

    /// The value of `key` and its window end, if the window has not ended at `now`.
    pub fn entry<Q>(&self, key: &Q, now: Timestamp) -> Option<(&V, Timestamp)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.by_key
            .get(key)
            .filter(|(_, end)| *end > now)
            .map(|(v, end)| (v, *end))
    }

    /// Remembers `key` until `end`, replacing what it held. A window already ended at `now`
    /// is not kept.
    pub fn insert(&mut self, key: K, value: V, end: Timestamp, now: Timestamp) {
        self.expire(now);
        if end <= now {
            return;
        }
        if self.by_key.len() >= self.cap && !self.by_key.contains_key(&key) {
            while self.by_key.len() >= self.cap {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.by_key.remove(&oldest);
            }
        }
        match self.by_key.entry(key) {
            Entry::Occupied(mut held) => {
                let old = held.get().1;
                self.order.remove(&(old, held.key().clone()));
                self.order.insert((end, held.key().clone()));
                held.insert((value, end));
            }
            Entry::Vacant(free) => {
                self.order.insert((end, free.key().clone()));
                free.insert((value, end));
            }
        }
    }

    /// Forgets `key` if `keep` says so of its value.
    pub fn remove_if(&mut self, key: &K, keep: impl FnOnce(&V) -> bool) {
        if let Some((v, end)) = self.by_key.get(key)
            && !keep(v)
        {
            let end = *end;
            self.by_key.remove(key);
            self.order.remove(&(end, key.clone()));
        }
    }

    /// Forgets every key whose window has ended at `now`.
    pub fn expire(&mut self, now: Timestamp) {
        while let Some((end, _)) = self.order.first() {
            if *end > now {
                break;
            }
            let (_, key) = self.order.pop_first().expect("checked");
            self.by_key.remove(&key);
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_forgotten_at_the_end_of_its_window() {
        let mut w = KeyWindow::new(10);
        w.insert(1u64, "a", 100, 0);
        assert_eq!(w.get(&1, 99), Some(&"a"));
        assert_eq!(w.get(&1, 100), None);
        w.expire(100);
        assert!(w.is_empty());
    }

    #[test]
    fn beyond_the_cap_the_window_ending_first_is_dropped() {
        let mut w = KeyWindow::new(2);
        w.insert("a".to_string(), 1, 300, 0);
        w.insert("b".to_string(), 2, 100, 0);
        w.insert("c".to_string(), 3, 200, 0);
        assert_eq!(w.len(), 2);
        assert_eq!(w.get(&"b".to_string(), 0), None);
        assert_eq!(w.get(&"a".to_string(), 0), Some(&1));
        w.insert("d".to_string(), 4, 10, 20);
        assert_eq!(w.get(&"d".to_string(), 0), None, "born expired");
        // Replacing a key at the cap drops no other key.
        w.insert("a".to_string(), 5, 400, 20);
        assert_eq!(w.len(), 2);
        assert_eq!(w.get("c", 20), Some(&3));
        assert_eq!(w.entry("a", 20), Some((&5, 400)));
        w.expire(300);
        assert_eq!(w.len(), 1, "the replaced window is the one kept");
    }

    #[test]
    fn a_replaced_key_keeps_one_window() {
        let mut w = KeyWindow::new(10);
        w.insert(7u64, 1, 100, 0);
        w.insert(7u64, 2, 50, 0);
        assert_eq!(w.entry(&7, 0), Some((&2, 50)));
        w.expire(60);
        assert!(w.is_empty());
        w.insert(8u64, 1, 100, 0);
        w.remove_if(&8, |v| *v != 1);
        assert!(w.is_empty());
    }
}
