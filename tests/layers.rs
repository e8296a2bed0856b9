//! The layout holds: each module of `src/` imports only the layers below
//! it (lib.rs's `# Layout` lists them), the HTTP/1.1 codec imports nothing
//! of the crate, and no files import each other in a cycle. Production
//! code only: a module's `#[cfg(test)] mod tests` may reach anywhere.
//!
//! `cargo test --test layers -- --nocapture` prints the module graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, bottom first. A module may import modules of a lower layer,
/// and within its own top-level module, files that do not import it back.
const LAYERS: &[&[&str]] = &[
    &["secret", "error_chain", "reply", "http1", "pki"],
    &["tls", "egress", "metrics"],
    &["config"],
    &["token", "listen", "telemetry", "shutdown"],
    &["guard", "upstream", "server"],
    &["proxy"],
    &["admin", "check", "healthcheck"],
    &["crate"],
];

/// A module's path (`proxy::body`, `crate` for lib.rs) for each source file.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path
                .strip_prefix(src)
                .map(|p| p.with_extension(""))
                .unwrap_or_default();
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = match parts.as_slice() {
                [only] if only == "lib" => "crate".to_owned(),
                [only] if only == "main" => continue,
                _ => parts.join("::"),
            };
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            found.insert(name, production(&text));
        }
    }
    found
}

/// The text before the file's test module, without comments, with no
/// white space around `::`.
fn production(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    // Block comments out.
    let mut code = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("/*") {
        code.push_str(&rest[..start]);
        rest = rest[start..]
            .find("*/")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    code.push_str(rest);
    let code = code
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    // `crate :: a` is `crate::a`.
    let mut joined = String::with_capacity(code.len());
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            let mut spaces = String::from(c);
            while let Some(&next) = chars.peek() {
                if !next.is_whitespace() {
                    break;
                }
                spaces.push(next);
                chars.next();
            }
            if chars.peek() == Some(&':') || joined.ends_with("::") {
                continue;
            }
            joined.push_str(&spaces);
        } else {
            joined.push(c);
        }
    }
    joined
}

/// The paths `text` names after `prefix` (`crate::`, `super::`, a child's
/// `name::`), braces of a `use` expanded one level.
fn paths_after(text: &str, prefix: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find(prefix) {
        let at = from + found;
        from = at + prefix.len();
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        expand("", &text[from..], &mut paths);
    }
    paths
}

/// The paths of a use tree at the start of `text`, `{a::b, c::{d, e}}`
/// included, each after `base`.
fn expand(base: &str, text: &str, paths: &mut Vec<String>) {
    let head = path_of(text);
    let after = &text[head.len()..];
    let base = match (base.is_empty(), head.is_empty()) {
        (_, true) => base.to_owned(),
        (true, false) => head.clone(),
        (false, false) => format!("{base}::{head}"),
    };
    let Some(group) = after
        .strip_prefix("::{")
        .or_else(|| (head.is_empty()).then(|| after.strip_prefix('{')).flatten())
    else {
        paths.push(base);
        return;
    };
    // The items of the group, split at its top-level commas.
    let mut depth = 0;
    let mut start = 0;
    for (at, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                let item = group[start..at].trim();
                if !item.is_empty() {
                    expand(&base, item, paths);
                }
                return;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                let item = group[start..at].trim();
                if !item.is_empty() {
                    expand(&base, item, paths);
                }
                start = at + 1;
            }
            _ => {}
        }
    }
}

fn path_of(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect::<String>()
        .trim_end_matches(':')
        .to_owned()
}

/// The module that `path` (from the crate's root) lands in: the longest
/// prefix that is a module.
fn target(path: &str, modules: &BTreeMap<String, String>) -> String {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    for end in (1..=parts.len()).rev() {
        let candidate = parts[..end].join("::");
        if modules.contains_key(&candidate) {
            return candidate;
        }
    }
    "crate".to_owned()
}

fn parent(module: &str) -> String {
    match module.rsplit_once("::") {
        Some((parent, _)) => parent.to_owned(),
        None => "crate".to_owned(),
    }
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// Each module and the modules it imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    // LAYERS_SRC: another tree's `src`, to print its graph for comparison.
    let src = std::env::var_os("LAYERS_SRC").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        std::path::PathBuf::from,
    );
    let modules = modules(&src);
    let mut graph = BTreeMap::new();
    for (module, text) in &modules {
        let mut imports = BTreeSet::new();
        for path in paths_after(text, "crate::") {
            imports.insert(target(&path, &modules));
        }
        let base = if module == "crate" {
            String::new()
        } else {
            format!("{module}::")
        };
        for path in paths_after(text, "super::") {
            // `super::super::x` climbs once more for each `super`.
            let mut up = parent(module);
            let mut path = path.as_str();
            while let Some(rest) = path.strip_prefix("super::") {
                up = parent(&up);
                path = rest;
            }
            let from = if up == "crate" {
                path.to_owned()
            } else {
                format!("{up}::{path}")
            };
            imports.insert(target(&from, &modules));
        }
        // Children named without a prefix (`use body::ProxyBody;`); a
        // facade's re-export of its children (`pub use body::ProxyBody;`)
        // is not a dependency of its own code.
        let own_code: String = text
            .lines()
            .filter(|line| {
                let line = line.trim_start();
                !(line.starts_with("pub use ") || line.starts_with("pub(crate) use "))
                    || line.contains("crate::")
                    || line.contains("super::")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let children: Vec<String> = modules
            .keys()
            .filter(|m| parent(m) == *module || (module == "crate" && !m.contains("::")))
            .filter(|m| *m != module)
            .cloned()
            .collect();
        for child in children {
            let name = child.rsplit("::").next().unwrap_or(&child).to_owned();
            for path in paths_after(&own_code, &format!("{name}::")) {
                imports.insert(target(&format!("{base}{name}::{path}"), &modules));
            }
        }
        imports.remove(module);
        graph.insert(module.clone(), imports);
    }
    graph
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&top(module)))
}

#[test]
fn modules_import_only_the_layers_below() {
    let graph = graph();
    let mut printed = String::new();
    for (module, imports) in &graph {
        let imports: Vec<&str> = imports.iter().map(String::as_str).collect();
        printed.push_str(&format!("{module} -> {}\n", imports.join(", ")));
    }
    println!("{printed}");
    let mut wrong = Vec::new();
    for (module, imports) in &graph {
        let Some(own) = layer(module) else {
            wrong.push(format!(
                "{module} is in no layer: add it to LAYERS and lib.rs's Layout"
            ));
            continue;
        };
        for import in imports {
            let same_top = top(import) == top(module);
            let lower = layer(import).is_some_and(|theirs| theirs < own);
            if !same_top && !lower {
                wrong.push(format!("{module} imports {import}, which is not below it"));
            }
            if top(module) == "http1" && top(import) != "http1" {
                wrong.push(format!(
                    "{module} imports {import}: the codec imports nothing of the crate"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_files_import_each_other_in_a_cycle() {
    let graph = graph();
    // Depth-first search for a back edge, reporting one cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == next).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, path) {
                        return Some(cycle);
                    }
                }
            }
        }
        path.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node.as_str()) {
            let cycle = visit(node, &graph, &mut state, &mut Vec::new());
            assert!(
                cycle.is_none(),
                "an import cycle: {}",
                cycle.unwrap_or_default().join(" -> ")
            );
        }
    }
}

#[test]
fn the_reader_sees_through_spacing_braces_and_comments() {
    let text = production(
        "use crate::{http1::{Known}, proxy::ProxyError};\ntype P = crate :: upstream::Answer;\n/* crate::server */\nuse super::super::token::Slot;",
    );
    let mut found = paths_after(&text, "crate::");
    found.sort();
    assert_eq!(
        found,
        ["http1::Known", "proxy::ProxyError", "upstream::Answer"]
    );
    assert_eq!(paths_after(&text, "super::"), ["super::token::Slot"]);
}
