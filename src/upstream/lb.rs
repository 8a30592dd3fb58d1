//! Load-balancer selection as pure functions over a host list: weighted round robin, random and least request
//! (power of two choices, Envoy's default `choice_count: 2`).

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

/// Least request with two choices: of the two candidate indexes, the one with fewer active requests; ties go to
/// the first.
pub fn least_of_two(a: usize, b: usize, active: impl Fn(usize) -> u32) -> usize {
    if active(b) < active(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

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
