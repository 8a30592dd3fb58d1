//! Load-balancer selection as pure functions over a host list: weighted round robin, random, least request
//! (power of two choices, Envoy's default `choice_count: 2`) and Envoy's ring hash (consistent hashing).

/// Cumulative weights of a host list; `pick` maps a number in `0..total` to the host whose range holds it.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    cumulative: Vec<u64>,
    uniform: bool,
}

impl Weights {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let mut cumulative = Vec::new();
        let mut sum = 0u64;
        let mut first = None;
        let mut uniform = true;
        for w in weights {
            // A zero weight (tcp_proxy weighted_clusters allows it) gets an empty range: never picked.
            let w = u64::from(w);
            if w == 0 || *first.get_or_insert(w) != w {
                uniform = false;
            }
            sum += w;
            cumulative.push(sum);
        }
        Weights { cumulative, uniform }
    }

    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    pub fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The host for the `n`th pick of a round robin, or for a random `n`. Equal weights skip the search.
    /// Every weight the same: the balancers' simple paths apply.
    pub fn uniform(&self) -> bool {
        self.uniform
    }

    pub fn pick(&self, n: u64) -> Option<usize> {
        let len = self.cumulative.len();
        if len == 0 {
            return None;
        }
        if self.uniform {
            return Some((n % len as u64) as usize);
        }
        let total = self.total();
        if total == 0 {
            return None;
        }
        let x = n % total;
        Some(self.cumulative.partition_point(|&c| c <= x))
    }
}

/// Envoy's RING_HASH ring: each host owns points on a 64-bit circle, as many as its share of the weight scaled to the
/// ring size, at the xxHash64 of `<address>_<n>`; a request's hash goes to the first point at or after it. Built the
/// way Envoy builds it (cumulative targets, so the total is what the scale asks for), so a host keeps its points when
/// others come and go.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// (point, host index), sorted by point.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// `hosts` are (address text, weight); `min` and `max` are `minimum_ring_size` and `maximum_ring_size`.
    pub fn build<'a>(hosts: impl IntoIterator<Item = (&'a str, u32)> + Clone, min: u64, max: u64) -> Ring {
        let total: u64 = hosts.clone().into_iter().map(|(_, w)| u64::from(w)).sum();
        let Some(min_weight) = hosts.clone().into_iter().map(|(_, w)| w).filter(|w| *w > 0).min() else {
            return Ring::default();
        };
        let min_normalized = f64::from(min_weight) / total as f64;
        let scale = ((min_normalized * min as f64).ceil() / min_normalized).min(max as f64);
        let mut points = Vec::with_capacity(scale as usize + 1);
        let (mut current, mut target) = (0.0f64, 0.0f64);
        for (index, (address, weight)) in hosts.into_iter().enumerate() {
            target += scale * f64::from(weight) / total as f64;
            let mut n = 0u64;
            while current < target {
                let key = format!("{address}_{n}");
                points.push((xxhash_rust::xxh64::xxh64(key.as_bytes(), 0), index as u32));
                n += 1;
                current += 1.0;
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The hosts in ring order from the point that owns `hash` (the owner first), for walking past hosts out of
    /// service.
    pub fn from(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(p, _)| *p < hash) % self.points.len().max(1);
        self.points[start..].iter().chain(&self.points[..start]).map(|(_, h)| *h as usize)
    }
}

/// Envoy's MAGLEV table: `size` (a prime) slots filled in turns, each host taking the next free slot of its own
/// permutation (offset and skip from two xxHash64s of its address) as often as its weight allows; a request's hash
/// picks slot `hash % size`.
#[derive(Debug, Clone, Default)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    pub fn build<'a>(hosts: impl IntoIterator<Item = (&'a str, u32)>, size: u64) -> Maglev {
        struct Entry {
            /// The host's index in the caller's list.
            index: u32,
            offset: u64,
            skip: u64,
            weight: f64,
            target: f64,
            next: u64,
        }
        // A host of weight 0 takes no slot.
        let hosts: Vec<(usize, &str, u32)> =
            hosts.into_iter().enumerate().filter(|(_, (_, w))| *w > 0).map(|(i, (a, w))| (i, a, w)).collect();
        let Some(max_weight) = hosts.iter().map(|(_, _, w)| *w).max() else { return Maglev::default() };
        if size < 2 {
            return Maglev::default();
        }
        let mut entries: Vec<Entry> = hosts
            .iter()
            .map(|(index, address, weight)| Entry {
                index: *index as u32,
                offset: xxhash_rust::xxh64::xxh64(address.as_bytes(), 0) % size,
                skip: xxhash_rust::xxh64::xxh64(address.as_bytes(), 1) % (size - 1) + 1,
                weight: f64::from(*weight) / f64::from(max_weight),
                target: 0.0,
                next: 0,
            })
            .collect();
        let mut table = vec![u32::MAX; size as usize];
        let mut filled = 0u64;
        let mut round = 1u64;
        while filled < size {
            for e in entries.iter_mut() {
                if filled >= size {
                    break;
                }
                // A host of the largest weight takes a slot every round, a lighter one in proportion.
                if e.weight * (round as f64) < e.target {
                    continue;
                }
                e.target += 1.0;
                let mut slot = (e.offset + e.skip * e.next) % size;
                while table[slot as usize] != u32::MAX {
                    e.next += 1;
                    slot = (e.offset + e.skip * e.next) % size;
                }
                table[slot as usize] = e.index;
                e.next += 1;
                filled += 1;
            }
            round += 1;
        }
        Maglev { table }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The host of the hash's slot, then those of the slots after it, for walking past hosts out of service.
    pub fn from(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = (hash % self.table.len().max(1) as u64) as usize;
        self.table[start..].iter().chain(&self.table[..start]).map(|h| *h as usize)
    }
}

/// A consistent-hashing table: Envoy's ring or its Maglev table.
#[derive(Debug, Clone)]
pub enum HashTable {
    Ring(Ring),
    Maglev(Maglev),
}

impl HashTable {
    pub fn len(&self) -> usize {
        match self {
            HashTable::Ring(r) => r.len(),
            HashTable::Maglev(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first host from the owner of `hash` on (in table order) that `usable` accepts; None if none does (the
    /// caller's panic mode decides whether ejected hosts are usable).
    pub fn pick(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            HashTable::Ring(r) => r.from(hash).find(|i| usable(*i)),
            HashTable::Maglev(m) => m.from(hash).find(|i| usable(*i)),
        }
    }
}

/// The hash of a request's value, as Envoy's hash policies compute it.
pub fn hash_value(v: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(v, 0)
}

/// Folds one more policy's hash into a request's, as Envoy does (rotate left by one, then xor).
pub fn combine(so_far: Option<u64>, next: u64) -> u64 {
    so_far.map_or(next, |h| h.rotate_left(1) ^ next)
}

/// Least request with two choices: of the two candidate indexes, the one with fewer active requests; ties go to
/// the first.
pub fn least_of_two(a: usize, b: usize, active: impl Fn(usize) -> u32) -> usize {
    if active(b) < active(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_hash_spreads_by_weight_and_keeps_keys_when_a_host_leaves() {
        let three = [("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 2)];
        let ring = Ring::build(three.iter().copied(), 1024, 8 * 1024 * 1024);
        assert!(ring.len() >= 1024, "{}", ring.len());
        let mut counts = [0u32; 3];
        for k in 0..4000u32 {
            counts[ring.from(hash_value(&k.to_le_bytes())).next().unwrap()] += 1;
        }
        // Weight 2 gets about half the keys; the others about a quarter each.
        assert!((1700..2300).contains(&counts[2]), "{counts:?}");
        assert!(counts[0] > 700 && counts[1] > 700, "{counts:?}");
        // Consistency: without host 1 the others keep their points (they gain some, as the ring is rescaled), so
        // most keys that were not on host 1 stay where they were; round robin over two hosts would keep half.
        let two = [("10.0.0.1:80", 1), ("10.0.0.3:80", 2)];
        let smaller = Ring::build(two.iter().copied(), 1024, 8 * 1024 * 1024);
        let (mut kept, mut elsewhere) = (0, 0);
        for k in 0..2000u32 {
            let h = hash_value(&k.to_le_bytes());
            let before = ring.from(h).next().unwrap();
            let after = smaller.from(h).next().unwrap();
            if before != 1 {
                elsewhere += 1;
                kept += u32::from((before, after) == (0, 0) || (before, after) == (2, 1));
            }
        }
        assert!(kept * 10 >= elsewhere * 8, "{kept} of {elsewhere} kept");
        assert!(Ring::build([("a", 0)].iter().copied(), 1024, 2048).is_empty());

        // Maglev: every slot filled, shares by weight, a lookup is the hash's slot.
        let maglev = Maglev::build(three.iter().copied(), 65537);
        let mut slots = [0u32; 3];
        for k in 0..65537u64 {
            slots[maglev.from(k).next().unwrap()] += 1;
        }
        assert_eq!(slots.iter().sum::<u32>(), 65537);
        assert!((32000..33600).contains(&slots[2]), "{slots:?}");
        assert!((16000..16800).contains(&slots[0]) && (16000..16800).contains(&slots[1]), "{slots:?}");
        let table = HashTable::Maglev(maglev);
        let owner = table.pick(12345, |_| true).unwrap();
        assert_ne!(table.pick(12345, |i| i != owner), Some(owner), "walks past a host out of service");
        assert_eq!(table.pick(12345, |_| false), None, "no host in service and no panic: none");
        assert_eq!(combine(None, 5), 5);
        assert_eq!(combine(Some(1), 1), 3);
    }

    #[test]
    fn uniform_round_robin_cycles() {
        let w = Weights::new([1, 1, 1]);
        let picks: Vec<_> = (0..6).filter_map(|n| w.pick(n)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weighted_picks_follow_the_weights() {
        let w = Weights::new([1, 3]);
        let mut counts = [0; 2];
        for n in 0..400 {
            if let Some(i) = w.pick(n) {
                counts[i] += 1;
            }
        }
        assert_eq!(counts, [100, 300]);
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let w = Weights::new([0, 5]);
        assert!((0..10).all(|n| w.pick(n) == Some(1)));
        assert_eq!(Weights::new([0, 0]).pick(3), None);
    }

    #[test]
    fn empty_set_picks_nothing() {
        assert_eq!(Weights::new([]).pick(7), None);
    }

    #[test]
    fn least_request_prefers_fewer_active() {
        let active = [5u32, 2];
        assert_eq!(least_of_two(0, 1, |i| active[i]), 1);
        assert_eq!(least_of_two(1, 0, |i| active[i]), 1);
        assert_eq!(least_of_two(0, 0, |i| active[i]), 0);
    }
}
