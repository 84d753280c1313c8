//! Topological ordering with cycle reporting.

/// Orders nodes so parents come first, keeping declaration order where the DAG
/// allows (Kahn's algorithm, lowest index first). On a cycle, returns one cycle's
/// nodes in dependency order.
pub(super) fn topological_order(parents: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = parents.len();
    let mut children = vec![Vec::new(); n];
    let mut missing: Vec<usize> = parents.iter().map(Vec::len).collect();
    for (child, ps) in parents.iter().enumerate() {
        for &p in ps {
            children[p].push(child);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| missing[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(next) = ready.pop_first() {
        order.push(next);
        for &c in &children[next] {
            missing[c] -= 1;
            if missing[c] == 0 {
                ready.insert(c);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    Err(find_cycle(parents, &missing))
}

/// Walks parent links among the unordered nodes until one repeats.
fn find_cycle(parents: &[Vec<usize>], missing: &[usize]) -> Vec<usize> {
    let Some(start) = (0..parents.len()).find(|&i| missing[i] > 0) else {
        return Vec::new();
    };
    let mut seen = vec![usize::MAX; parents.len()];
    let mut path = Vec::new();
    let mut node = start;
    loop {
        if seen[node] != usize::MAX {
            let mut cycle = path[seen[node]..].to_vec();
            cycle.reverse(); // parent -> child order
            return cycle;
        }
        seen[node] = path.len();
        path.push(node);
        // Some parent of an unordered node is itself unordered.
        match parents[node].iter().find(|&&p| missing[p] > 0) {
            Some(&p) => node = p,
            None => return path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_parents_first_and_reports_cycles() {
        // 0 <- 2, 1 <- 0
        assert_eq!(
            topological_order(&[vec![2], vec![0], vec![]]),
            Ok(vec![2, 0, 1])
        );
        // 0 -> 1 -> 2 -> 0 plus a free node 3
        let cycle = topological_order(&[vec![2], vec![0], vec![1], vec![]]).unwrap_err();
        assert_eq!(cycle.len(), 3);
        let mut sorted = cycle;
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
        assert_eq!(topological_order(&[vec![0]]), Err(vec![0]));
    }
}
