// The console list: keyboard navigation, filters that apply as they change, and the status
// and viewers of the rows shown, refreshed from the same query's JSON while the page is open.
// The page works without it (the form submits, links open).

const REFRESH_SECONDS = 10;
const $ = (id) => document.getElementById(id);
const links = () => [...document.querySelectorAll('#consoles a.open')];

// Keys: "/" search, ↓/↑ (or j/k) move between consoles, Home/End first/last, Enter opens
// (the link's own), "[" and "]" the previous and next page, Escape leaves the search box.
document.addEventListener('keydown', (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const typing = e.target.matches('input, select, textarea');
  if (typing) {
    if (e.key === 'Escape') e.target.blur();
    else if (e.key === 'ArrowDown' && e.target.id === 'search' && links().length) {
      e.preventDefault();
      links()[0].focus();
    }
    return;
  }
  const all = links();
  const at = all.indexOf(document.activeElement);
  const move = (index) => {
    if (!all.length) return;
    e.preventDefault();
    const target = all[Math.max(0, Math.min(all.length - 1, index))];
    target.focus();
    target.closest('tr').scrollIntoView({ block: 'nearest' });
  };
  switch (e.key) {
    case '/': e.preventDefault(); $('search').focus(); $('search').select(); break;
    case 'ArrowDown': case 'j': move(at + 1); break;
    case 'ArrowUp': case 'k':
      if (at <= 0 && all.length) { e.preventDefault(); $('search').focus(); } else move(at - 1);
      break;
    case 'Home': move(0); break;
    case 'End': move(all.length - 1); break;
    case '[': if ($('prev')) location.assign($('prev').href); break;
    case ']': if ($('next')) location.assign($('next').href); break;
    default: break;
  }
});

// A changed select filters at once; a filter change starts again from page 1.
for (const id of ['namespace', 'phase', 'per']) {
  $(id).addEventListener('change', () => $('filters').requestSubmit());
}

function renderRow(row, item) {
  row.dataset.phase = item.phase;
  const phase = row.querySelector('.phase');
  phase.textContent = item.phase;
  phase.dataset.phase = item.phase;
  const reason = row.querySelector('.reason');
  reason.textContent = item.reason;
  reason.title = item.message;
  const viewers = row.querySelector('.viewers');
  viewers.replaceChildren();
  item.viewers.forEach((viewer, index) => {
    if (index) viewers.append(', ');
    const span = document.createElement('span');
    span.className = 'viewer';
    span.dataset.mode = viewer.mode;
    span.textContent = `${viewer.user} (${viewer.mode})`;  // text, never HTML
    viewers.append(span);
  });
}

async function refresh() {
  if (document.hidden) return;
  const url = new URL('api/v1/consoles', location.href);
  url.search = document.body.dataset.query;
  try {
    const response = await fetch(url, { credentials: 'same-origin' });
    if (!response.ok) return;
    const body = await response.json();
    const byKey = new Map(body.consoles.map((c) => [`${c.namespace}/${c.name}`, c]));
    for (const row of document.querySelectorAll('#consoles tr.console')) {
      const item = byKey.get(row.dataset.key);
      if (item) renderRow(row, item);
    }
    document.body.dataset.refreshed = String(Date.now());
  } catch {
    // The next refresh tries again; the page still shows the last known state.
  }
}

// Thumbnails (spec.thumbnail): the relay keeps each 30 s, so ask again at that pace; one that
// cannot be made (404 with the reason) is hidden.
const THUMBNAIL_SECONDS = 30;
for (const img of document.querySelectorAll('img.thumb')) {
  img.addEventListener('error', () => { img.hidden = true; });
  img.addEventListener('load', () => { img.hidden = false; });
}
setInterval(() => {
  if (document.hidden) return;
  for (const img of document.querySelectorAll('img.thumb')) {
    const url = new URL(img.src);
    url.searchParams.set('at', String(Date.now()));
    img.src = url.href;
  }
}, THUMBNAIL_SECONDS * 1000);

setInterval(refresh, REFRESH_SECONDS * 1000);
document.addEventListener('visibilitychange', refresh);
