#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler from Debian bookworm's `kubernetes` source
# package (all Go dependencies vendored, so it builds offline) and caches them outside the repo.
# The Kubernetes tests run a real control plane on loopback; no registry ships these binaries.
# Cold build: about 9 minutes and 1.4 GB of memory, once per machine; later runs return at once.
set -euo pipefail

VERSION="${KUBE_VERSION:-v1.20.2}"
CACHE="${VISIONTUNE_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/visiontune/kube-$VERSION}"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)
cached=1
for b in "${BINARIES[@]}"; do [[ -x "$CACHE/$b" ]] || cached=0; done
if ((cached)); then
  echo "kube control plane $VERSION cached in $CACHE"
  exit 0
fi

need=()
command -v go >/dev/null || need+=(golang-go)
command -v rsync >/dev/null || need+=(rsync)
command -v etcd >/dev/null || need+=(etcd-server)
if ((${#need[@]})); then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

WORK="$(mktemp -d /tmp/vt-kube-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK" # apt's download user reads its lists here

# A private deb-src list derived from the machine's own Debian entry, so /etc/apt is left alone.
mkdir -p "$WORK/parts" "$WORK/lists/partial" "$WORK/cache/archives/partial"
own="$(grep -l '^Types: *deb' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)"
if [[ -z "$own" ]]; then
  echo "no deb822 Debian source entry under /etc/apt/sources.list.d: cannot fetch the kubernetes source" >&2
  exit 1
fi
sed 's/^Types: *deb$/Types: deb-src/' "$own" >"$WORK/parts/vt-src.sources"
APT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$WORK/parts"
  -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache")
echo "== fetching Debian's kubernetes source package"
apt-get "${APT[@]}" -qq update
(cd "$WORK" && apt-get "${APT[@]}" -qq source --download-only kubernetes)
tar -C "$WORK" -xf "$(ls "$WORK"/kubernetes_*.orig.tar.* | head -n1)"
SRC="$(find "$WORK" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes*' | head -n1)"

# Module mode fails on this tree (go.mod updates needed under -mod=vendor): build in GOPATH mode.
export GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" GO111MODULE=off GOPROXY=off CGO_ENABLED=0 GOFLAGS=
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$SRC" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
echo "== generating OpenAPI definitions"
make gen_openapi >/dev/null
echo "== building ${BINARIES[*]} (several minutes)"
go build -ldflags "-s -w -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitVersion=$VERSION" \
  -o "$WORK/out/" "${BINARIES[@]/#/./cmd/}"
mkdir -p "$CACHE"
install -m 0755 "${BINARIES[@]/#/$WORK/out/}" "$CACHE/"
echo "kube control plane $VERSION built into $CACHE"
