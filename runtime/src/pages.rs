//! KV-cache pages and prefix reuse. The latent and indexer caches are split into pages of `page_size`
//! tokens; [`PagePool`] hands pages out with reference counts (a page shared by requests with a common
//! prefix is freed when its last user releases it), and [`PrefixCache`] remembers which pages hold which
//! token prefixes, so a request that starts like an earlier one reuses its pages instead of recomputing
//! them (SGLang's radix cache, at page granularity). Unused cached prefixes are evicted least recently
//! used first when the pool runs out.
use std::collections::HashMap;

/// A page of the KV cache: the device model's store keeps its rows at page · page_size + slot.
pub use nsa_model::paged::PageId;

/// Fixed-size pages with reference counts.
pub struct PagePool {
    page_size: usize,
    free: Vec<PageId>,
    refs: Vec<u32>,
}

impl PagePool {
    pub fn new(pages: usize, page_size: usize) -> PagePool {
        assert!(page_size > 0, "pages hold at least one token");
        PagePool {
            page_size,
            free: (0..pages as PageId).rev().collect(),
            refs: vec![0; pages],
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    pub fn total_pages(&self) -> usize {
        self.refs.len()
    }

    /// `n` fresh pages (one reference each), or `None` (nothing taken) when fewer are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<PageId>> {
        if n > self.free.len() {
            return None;
        }
        let pages = self.free.split_off(self.free.len() - n);
        for &p in &pages {
            self.refs[p as usize] = 1;
        }
        Some(pages)
    }

    /// One more user of `page`.
    pub fn retain(&mut self, page: PageId) {
        assert!(self.refs[page as usize] > 0, "retaining free page {page}");
        self.refs[page as usize] += 1;
    }

    /// One user fewer; the page is free again when none is left.
    pub fn release(&mut self, page: PageId) {
        let refs = &mut self.refs[page as usize];
        assert!(*refs > 0, "releasing free page {page}");
        *refs -= 1;
        if *refs == 0 {
            self.free.push(page);
        }
    }

    pub fn refs(&self, page: PageId) -> u32 {
        self.refs[page as usize]
    }
}

struct Node {
    /// The page holding this node's tokens (one full page).
    page: PageId,
    parent: Option<usize>,
    children: HashMap<Vec<u32>, usize>,
    /// Requests using this prefix now (they hold their own page references too).
    locks: u32,
    last_use: u64,
}

/// Token prefixes in full pages → the pages holding their cache. The cache holds one reference on every
/// page it lists.
#[derive(Default)]
pub struct PrefixCache {
    nodes: Vec<Option<Node>>,
    roots: HashMap<Vec<u32>, usize>,
    clock: u64,
}

/// A prefix found in the cache: its length in tokens, its pages, and the node to unlock when done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixMatch {
    pub tokens: usize,
    pub pages: Vec<PageId>,
    node: Option<usize>,
}

impl PrefixCache {
    pub fn new() -> PrefixCache {
        PrefixCache::default()
    }

    /// Pages the cache holds.
    pub fn cached_pages(&self) -> usize {
        self.nodes.iter().flatten().count()
    }

    fn children(&self, node: Option<usize>) -> &HashMap<Vec<u32>, usize> {
        match node {
            Some(n) => &self.nodes[n].as_ref().expect("live node").children,
            None => &self.roots,
        }
    }

    /// The longest cached prefix of `tokens` in full pages, locked against eviction (and each page
    /// retained for the caller) until [`Self::unlock`].
    pub fn lookup(&mut self, tokens: &[u32], pool: &mut PagePool) -> PrefixMatch {
        self.clock += 1;
        let mut node = None;
        let mut pages = Vec::new();
        for chunk in tokens.chunks_exact(pool.page_size()) {
            let Some(&next) = self.children(node).get(chunk) else {
                break;
            };
            node = Some(next);
            pages.push(self.nodes[next].as_ref().expect("live node").page);
        }
        let mut at = node;
        while let Some(n) = at {
            let live = self.nodes[n].as_mut().expect("live node");
            live.locks += 1;
            live.last_use = self.clock;
            at = live.parent;
        }
        for &p in &pages {
            pool.retain(p);
        }
        PrefixMatch {
            tokens: pages.len() * pool.page_size(),
            pages,
            node,
        }
    }

    /// Ends a [`Self::lookup`]: the prefix may be evicted again (the caller releases its own page
    /// references).
    pub fn unlock(&mut self, found: &PrefixMatch) {
        let mut at = found.node;
        while let Some(n) = at {
            let live = self.nodes[n].as_mut().expect("live node");
            live.locks -= 1;
            at = live.parent;
        }
    }

    /// Remembers that `pages` hold the cache of `tokens` (full pages only; a partial last page is not
    /// cached). Pages already cached for the same prefix are kept; the cache retains the new ones.
    pub fn insert(&mut self, tokens: &[u32], pages: &[PageId], pool: &mut PagePool) {
        self.clock += 1;
        let mut node: Option<usize> = None;
        for (chunk, &page) in tokens.chunks_exact(pool.page_size()).zip(pages) {
            if let Some(&next) = self.children(node).get(chunk) {
                node = Some(next);
                self.nodes[next].as_mut().expect("live node").last_use = self.clock;
                continue;
            }
            pool.retain(page);
            let id = self.nodes.len();
            self.nodes.push(Some(Node {
                page,
                parent: node,
                children: HashMap::new(),
                locks: 0,
                last_use: self.clock,
            }));
            match node {
                Some(n) => self.nodes[n]
                    .as_mut()
                    .expect("live node")
                    .children
                    .insert(chunk.to_vec(), id),
                None => self.roots.insert(chunk.to_vec(), id),
            };
            node = Some(id);
        }
    }

    /// Frees cached pages, least recently used unlocked leaves first, until `pages` are free in the pool
    /// or nothing more can go; returns whether enough are free.
    pub fn evict(&mut self, pages: usize, pool: &mut PagePool) -> bool {
        while pool.free_pages() < pages {
            let victim = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
                .filter(|(_, n)| n.children.is_empty() && n.locks == 0)
                .min_by_key(|(_, n)| n.last_use)
                .map(|(i, _)| i);
            let Some(victim) = victim else {
                return false;
            };
            let node = self.nodes[victim].take().expect("live node");
            let siblings = match node.parent {
                Some(p) => &mut self.nodes[p].as_mut().expect("live node").children,
                None => &mut self.roots,
            };
            siblings.retain(|_, child| *child != victim);
            pool.release(node.page);
        }
        true
    }
}
