//! The template registry: templates by (namespace, name, version), loaded from a
//! directory and hot-reloaded on change. Lookups are lock-free (`arc-swap`); a
//! lookup without a version takes the highest.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use crate::decide::Rejection;
use crate::handler::HandlerRegistry;
use crate::record::RejectReason;
use crate::template::{Template, TemplateErrors};

type Versions = BTreeMap<semver::Version, Arc<Template>>;

/// Every installed template.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    by_name: BTreeMap<(String, String), Versions>,
}

impl Catalog {
    pub fn templates(&self) -> impl Iterator<Item = &Arc<Template>> {
        self.by_name.values().flat_map(|v| v.values())
    }

    fn insert(&mut self, t: Arc<Template>) {
        self.by_name
            .entry((t.namespace().to_owned(), t.name().to_owned()))
            .or_default()
            .insert(t.version.clone(), t);
    }
}

/// The outcome of (re)loading a directory.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Files that failed validation; their previous version (if any) stays installed.
    pub errors: Vec<TemplateErrors>,
}

/// What a template file held when last read.
struct FileEntry {
    fingerprint: (SystemTime, u64),
    template: Option<Arc<Template>>,
}

/// Templates by name and version, shared by every processor.
pub struct TemplateRegistry {
    catalog: ArcSwap<Catalog>,
    handlers: Arc<HandlerRegistry>,
    /// Templates added from code (bundled examples, tests); never removed by reloads.
    builtin: Mutex<Vec<Arc<Template>>>,
    dir: Option<PathBuf>,
    files: Mutex<BTreeMap<PathBuf, FileEntry>>,
}

impl fmt::Debug for TemplateRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TemplateRegistry")
            .field("dir", &self.dir)
            .field("templates", &self.catalog.load().templates().count())
            .finish()
    }
}

impl TemplateRegistry {
    pub fn new(handlers: Arc<HandlerRegistry>, dir: Option<PathBuf>) -> Self {
        TemplateRegistry {
            catalog: ArcSwap::from_pointee(Catalog::default()),
            handlers,
            builtin: Mutex::new(Vec::new()),
            dir,
            files: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn handlers(&self) -> &Arc<HandlerRegistry> {
        &self.handlers
    }

    /// Installs a template from code after checking its handlers.
    pub fn add(&self, template: Template, origin: &str) -> Result<Arc<Template>, TemplateErrors> {
        template.check_handlers(origin, |h| self.handlers.is_known(h))?;
        let t = Arc::new(template);
        self.builtin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&t));
        self.rebuild();
        Ok(t)
    }

    /// Parses and installs YAML text.
    pub fn add_yaml(&self, yaml: &str, origin: &str) -> Result<Arc<Template>, TemplateErrors> {
        self.add(Template::from_yaml(yaml, origin)?, origin)
    }

    /// The current catalog (a consistent snapshot).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    /// Finds `namespace/name` at `version`: an exact version, a semver requirement
    /// (`^1.2`, `~1`), or `None` for the highest installed.
    pub fn resolve(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<Template>, Rejection> {
        let catalog = self.catalog.load();
        let versions = catalog
            .by_name
            .get(&(namespace.to_owned(), name.to_owned()))
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Rejection::new(
                    RejectReason::UnknownTemplate,
                    format!("no template {namespace}/{name} is installed"),
                )
            })?;
        let unknown = |v: &str| {
            let have: Vec<String> = versions.keys().map(ToString::to_string).collect();
            Rejection::new(
                RejectReason::UnknownVersion,
                format!(
                    "{namespace}/{name} has no version matching `{v}` (installed: {})",
                    have.join(", ")
                ),
            )
        };
        match version.map(str::trim).filter(|v| !v.is_empty()) {
            None => versions
                .values()
                .next_back()
                .cloned()
                .ok_or_else(|| unknown("*")),
            Some(v) => {
                if let Ok(exact) = semver::Version::parse(v) {
                    return versions.get(&exact).cloned().ok_or_else(|| unknown(v));
                }
                let req = semver::VersionReq::parse(v).map_err(|e| {
                    Rejection::new(
                        RejectReason::UnknownVersion,
                        format!("`{v}` is not a version or version requirement: {e}"),
                    )
                })?;
                versions
                    .iter()
                    .rev()
                    .find(|(ver, _)| req.matches(ver))
                    .map(|(_, t)| Arc::clone(t))
                    .ok_or_else(|| unknown(v))
            }
        }
    }

    /// Loads every `*.yaml`/`*.yml` under the directory (recursively), keeping the
    /// previous version of files that no longer validate.
    pub fn load_dir(&self) -> LoadReport {
        let Some(dir) = self.dir.clone() else {
            return LoadReport::default();
        };
        let mut report = LoadReport::default();
        let mut paths = Vec::new();
        collect_yaml(&dir, &mut paths);
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.retain(|p, _| paths.contains(p));
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let fingerprint = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if files
                .get(&path)
                .is_some_and(|e| e.fingerprint == fingerprint)
            {
                continue;
            }
            let origin = path.display().to_string();
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| {
                    TemplateErrors(vec![crate::template::TemplateError {
                        file: origin.clone(),
                        field: "file".into(),
                        kind: crate::template::TemplateErrorKind::Invalid(e.to_string()),
                    }])
                })
                .and_then(|text| Template::from_yaml(&text, &origin))
                .and_then(|t| {
                    t.check_handlers(&origin, |h| self.handlers.is_known(h))?;
                    Ok(t)
                });
            let previous = files.get(&path).and_then(|e| e.template.clone());
            let template = match parsed {
                Ok(t) => {
                    report.loaded.push(t.snapshot().qualified_name());
                    Some(Arc::new(t))
                }
                Err(errors) => {
                    report.errors.push(errors);
                    previous
                }
            };
            files.insert(
                path,
                FileEntry {
                    fingerprint,
                    template,
                },
            );
        }
        drop(files);
        self.rebuild();
        report
    }

    fn rebuild(&self) {
        let mut catalog = Catalog::default();
        for t in self
            .builtin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            catalog.insert(Arc::clone(t));
        }
        for entry in self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if let Some(t) = &entry.template {
                catalog.insert(Arc::clone(t));
            }
        }
        self.catalog.store(Arc::new(catalog));
    }

    /// Reloads the directory every `interval` on a background thread until the
    /// returned guard is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> WatchGuard {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let registry = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("tasker-templates".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    let report = registry.load_dir();
                    for name in &report.loaded {
                        tracing::info!(template = %name, "template loaded");
                    }
                    for e in &report.errors {
                        tracing::error!(error = %e, "template rejected; keeping the previous version");
                    }
                }
            })
            .ok();
        WatchGuard { stop, handle }
    }
}

/// Stops the template watcher when dropped.
#[derive(Debug)]
pub struct WatchGuard {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_yaml(&path, out);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
        {
            out.push(path);
        }
    }
    out.sort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(version: &str, handler: &str) -> String {
        format!(
            "namespace: shop\nname: order\nversion: {version}\nsteps:\n  - name: a\n    handler: {handler}\n"
        )
    }

    #[test]
    fn resolves_versions_and_reloads_changed_files() {
        let dir = tempfile::TempDir::new().unwrap();
        let reg = TemplateRegistry::new(
            Arc::new(HandlerRegistry::with_builtins()),
            Some(dir.path().to_owned()),
        );
        std::fs::write(dir.path().join("a.yaml"), yaml("1.0.0", "noop")).unwrap();
        std::fs::create_dir(dir.path().join("nested")).unwrap();
        std::fs::write(dir.path().join("nested/b.yml"), yaml("1.4.2", "noop")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let report = reg.load_dir();
        assert_eq!(report.loaded.len(), 2);
        assert!(report.errors.is_empty());
        assert_eq!(
            reg.resolve("shop", "order", None)
                .unwrap()
                .version
                .to_string(),
            "1.4.2"
        );
        assert_eq!(
            reg.resolve("shop", "order", Some("1.0.0"))
                .unwrap()
                .version
                .to_string(),
            "1.0.0"
        );
        assert_eq!(
            reg.resolve("shop", "order", Some("^1.1"))
                .unwrap()
                .version
                .to_string(),
            "1.4.2"
        );
        assert_eq!(
            reg.resolve("shop", "order", Some("2.0.0"))
                .unwrap_err()
                .reason,
            RejectReason::UnknownVersion
        );
        assert_eq!(
            reg.resolve("shop", "nope", None).unwrap_err().reason,
            RejectReason::UnknownTemplate
        );

        // A broken edit keeps the previous version installed and reports the file.
        std::fs::write(
            dir.path().join("nested/b.yml"),
            yaml("1.4.3", "no_such_handler") + "\n",
        )
        .unwrap();
        let report = reg.load_dir();
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].to_string().contains("no_such_handler"));
        assert_eq!(
            reg.resolve("shop", "order", None)
                .unwrap()
                .version
                .to_string(),
            "1.4.2"
        );

        // A fixed edit replaces it; a deleted file disappears.
        std::fs::write(dir.path().join("nested/b.yml"), yaml("1.5.0", "sleep")).unwrap();
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let report = reg.load_dir();
        assert_eq!(report.loaded, vec!["shop/order@1.5.0".to_string()]);
        assert_eq!(
            reg.resolve("shop", "order", None)
                .unwrap()
                .version
                .to_string(),
            "1.5.0"
        );
        assert!(reg.resolve("shop", "order", Some("1.0.0")).is_err());
    }
}
