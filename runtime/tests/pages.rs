//! KV pages and prefix reuse: allocation, sharing, LRU eviction that never touches a prefix in use, and a
//! random workload after which every page is accounted for.
use nsa_runtime::pages::{PagePool, PrefixCache};

#[test]
fn pages_are_handed_out_shared_and_freed() {
    let mut pool = PagePool::new(4, 64);
    let a = pool.alloc(3).unwrap();
    assert_eq!(pool.free_pages(), 1);
    assert!(pool.alloc(2).is_none(), "not enough pages: nothing taken");
    assert_eq!(pool.free_pages(), 1);
    pool.retain(a[0]);
    pool.release(a[0]);
    assert_eq!(pool.refs(a[0]), 1);
    for p in a {
        pool.release(p);
    }
    assert_eq!(pool.free_pages(), 4);
}

#[test]
fn a_common_prefix_reuses_whole_pages() {
    let mut pool = PagePool::new(16, 4);
    let mut cache = PrefixCache::new();
    let first: Vec<u32> = (0..14).collect(); // 3 full pages + 2 tokens
    let pages = pool.alloc(4).unwrap();
    cache.insert(&first, &pages, &mut pool);
    assert_eq!(cache.cached_pages(), 3, "the partial last page is not cached");
    for &p in &pages {
        pool.release(p); // the request ends
    }
    assert_eq!(pool.free_pages(), 13);

    // Same first 9 tokens: two full pages match.
    let second: Vec<u32> = (0..9).chain([99, 98, 97]).collect();
    let found = cache.lookup(&second, &mut pool);
    assert_eq!((found.tokens, found.pages.as_slice()), (8, &pages[..2]));
    assert_eq!(pool.refs(pages[0]), 2, "cache + the new request");
    // Nothing to match: an empty prefix.
    let other = cache.lookup(&[7, 7, 7, 7, 7], &mut pool);
    assert_eq!(other.tokens, 0);
    cache.unlock(&other);

    // In use, the matched prefix survives eviction; the third page (unlocked leaf) goes.
    assert!(!cache.evict(16, &mut pool));
    assert_eq!(cache.cached_pages(), 2);
    cache.unlock(&found);
    for &p in &found.pages {
        pool.release(p);
    }
    assert!(cache.evict(16, &mut pool));
    assert_eq!((cache.cached_pages(), pool.free_pages()), (0, 16));
}

#[test]
fn eviction_takes_the_least_recently_used_prefix_first() {
    let mut pool = PagePool::new(2, 2);
    let mut cache = PrefixCache::new();
    for tokens in [[1u32, 1], [2, 2]] {
        let pages = pool.alloc(1).unwrap();
        cache.insert(&tokens, &pages, &mut pool);
        pool.release(pages[0]);
    }
    let used = cache.lookup(&[1, 1], &mut pool); // [1, 1] is now the most recent
    cache.unlock(&used);
    pool.release(used.pages[0]);
    assert!(cache.evict(1, &mut pool));
    assert_eq!(cache.lookup(&[2, 2], &mut pool).tokens, 0, "[2, 2] was evicted");
    assert_eq!(cache.lookup(&[1, 1], &mut pool).tokens, 2, "[1, 1] stayed");
}

#[test]
fn a_random_workload_accounts_for_every_page() {
    let (page_size, total) = (4, 64);
    let mut pool = PagePool::new(total, page_size);
    let mut cache = PrefixCache::new();
    let mut state = 12345u64;
    let mut next = |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    for _ in 0..500 {
        // Prompts from a few shared stems, so prefixes repeat.
        let stem = next(4) as u32;
        let len = 1 + next(30) as usize;
        let tokens: Vec<u32> = (0..len)
            .map(|i| if i < 10 { stem * 100 + i as u32 } else { next(5) as u32 })
            .collect();
        let found = cache.lookup(&tokens, &mut pool);
        let needed = tokens.len().div_ceil(page_size) - found.pages.len();
        if pool.free_pages() < needed && !cache.evict(needed, &mut pool) {
            cache.unlock(&found);
            found.pages.iter().for_each(|&p| pool.release(p));
            continue; // would wait for memory
        }
        let mut pages = found.pages.clone();
        pages.extend(pool.alloc(needed).expect("evicted enough"));
        cache.insert(&tokens, &pages, &mut pool);
        cache.unlock(&found);
        pages.iter().for_each(|&p| pool.release(p));
        // Between requests, every used page is held by the cache alone.
        assert_eq!(pool.free_pages() + cache.cached_pages(), total);
    }
    assert!(cache.evict(total, &mut pool));
    assert_eq!((pool.free_pages(), cache.cached_pages()), (total, 0));
}
