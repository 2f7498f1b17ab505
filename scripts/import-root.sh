# Sourced by scripts/typecheck and scripts/lint-imports: tools that follow imports need
# the package as it is imported (`edgefleet.{device,server,models}`). pyproject maps the
# folders onto that root, which the tools cannot follow, so a throwaway tree of symlinks
# under .typecheck/ gives them the real module names.
import_root() {
  local root=.typecheck/edgefleet
  rm -rf .typecheck && mkdir -p "$root"
  for pkg in device server models; do ln -s "../../$pkg" "$root/$pkg"; done
}
