//! `SmallMap`: the per-channel tables of the data path (sequence numbers per peer,
//! credits per target). An actor talks to few peers, and most sends go to the peer
//! of the send before, so a short vector searched linearly with the last hit tried
//! first beats hashing; past `LINEAR_MAX` entries a hash index takes over.

use crate::ids::{ActorId, IdMap};

/// Entries searched linearly before a hash index is built.
const LINEAR_MAX: usize = 8;

#[derive(Default)]
pub struct SmallMap<V> {
    entries: Vec<(ActorId, V)>,
    last: usize,
    index: Option<IdMap<ActorId, usize>>,
}

impl<V: Default> SmallMap<V> {
    /// The value of `key`, inserted as `V::default()` if absent.
    #[inline]
    pub fn entry(&mut self, key: ActorId) -> &mut V {
        if let Some(position) = self.position(key) {
            self.last = position;
            return &mut self.entries[position].1;
        }
        self.entries.push((key, V::default()));
        let position = self.entries.len() - 1;
        match &mut self.index {
            Some(index) => {
                index.insert(key, position);
            }
            None if self.entries.len() > LINEAR_MAX => {
                let index = self
                    .entries
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (*k, i))
                    .collect();
                self.index = Some(index);
            }
            None => {}
        }
        self.last = position;
        &mut self.entries[position].1
    }

    #[inline]
    pub fn get_mut(&mut self, key: ActorId) -> Option<&mut V> {
        let position = self.position(key)?;
        self.last = position;
        Some(&mut self.entries[position].1)
    }

    /// The value of `key`, read only (the last-hit hint is not moved).
    #[inline]
    pub fn get(&self, key: ActorId) -> Option<&V> {
        self.position(key).map(|p| &self.entries[p].1)
    }

    #[inline]
    fn position(&self, key: ActorId) -> Option<usize> {
        if self.entries.get(self.last).is_some_and(|(k, _)| *k == key) {
            return Some(self.last);
        }
        match &self.index {
            Some(index) => index.get(&key).copied(),
            None => self.entries.iter().position(|(k, _)| *k == key),
        }
    }

    /// Keep only the entries whose key passes `keep` (a cold path: it rebuilds
    /// the index).
    pub fn retain(&mut self, mut keep: impl FnMut(&ActorId) -> bool) {
        let before = self.entries.len();
        self.entries.retain(|(key, _)| keep(key));
        if self.entries.len() == before {
            return;
        }
        self.last = 0;
        self.index = (self.entries.len() > LINEAR_MAX).then(|| {
            self.entries
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (*k, i))
                .collect()
        });
        if self.entries.capacity() > 2 * self.entries.len().max(LINEAR_MAX) {
            self.entries.shrink_to_fit();
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(ActorId, V)> {
        self.entries.iter()
    }
}

impl<V: Default> FromIterator<(ActorId, V)> for SmallMap<V> {
    fn from_iter<I: IntoIterator<Item = (ActorId, V)>>(iter: I) -> Self {
        let mut map = SmallMap {
            entries: Vec::new(),
            last: 0,
            index: None,
        };
        for (key, value) in iter {
            *map.entry(key) = value;
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::JobId;

    #[test]
    fn behaves_like_a_map_below_and_above_the_linear_limit() {
        let mut small = SmallMap::<u64>::default();
        let mut reference = std::collections::HashMap::new();
        let mut rng = crate::runtime::sim::SimRng::new(7);
        for _ in 0..10_000 {
            let key = ActorId::new(JobId(1), 2, rng.below(40) as u32);
            let add = rng.below(5);
            *small.entry(key) += add;
            *reference.entry(key).or_insert(0) += add;
            let probe = ActorId::new(JobId(1), 2, rng.below(60) as u32);
            assert_eq!(
                small.get_mut(probe).copied(),
                reference.get(&probe).copied()
            );
        }
        assert_eq!(small.iter().count(), reference.len());
        for (key, value) in small.iter() {
            assert_eq!(reference[key], *value);
        }
    }
}
