"""report.html and the compare page in a real browser: headless Chromium driven through WebDriver.

The fixture installs Debian's `chromium` and `chromium-driver` with apt-get where they are missing and
the tests run as root (as CI does, on a fresh machine); where that cannot be done the tests are skipped
with the reason, never passed. The install lives here and not in scripts/setup.sh so that `make demo`
never needs root or a browser: only the tests that use one pay for it.
"""

import csv
import io
import os
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from matplotlib.image import imread
from report_runs import EXAMPLES, make_run
from test_report_html import long_run

from loralab.commands.compare import compare_page
from loralab.files import atomic_write_text
from loralab.runs.readers import format_metric, read_run

PACKAGES = ("chromium", "chromium-driver")


def _binaries() -> tuple[str | None, str | None]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    return browser, shutil.which("chromedriver")


def _apt_install() -> str:
    """Install the browser with apt-get; return why it could not be done, or '' when it was."""
    if not shutil.which("apt-get"):
        return "apt-get is not available (not a Debian-based system)"
    if os.geteuid() != 0:
        return f"not root, so apt-get cannot install {' '.join(PACKAGES)} (install them, then rerun)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    for command in (install, ["apt-get", "update", "-q"], install):  # update only when the first try fails
        try:
            done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` took over 15 minutes"
        if command == install and done.returncode == 0:
            return ""
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"`{' '.join(install)}` failed: {tail[0]}"


@pytest.fixture(scope="session")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    browser_path, driver_path = _binaries()
    if not (browser_path and driver_path):
        reason = _apt_install()
        browser_path, driver_path = _binaries()
        if not (browser_path and driver_path):
            pytest.skip(f"headless Chromium not available: {reason or 'installed, but not found on PATH'}")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("pages")
    runs = [make_run(root / "r8", r=8, name="r8"), make_run(root / "r16", r=16, name="r16", shift=0.1, loss_scale=0.9)]
    compare = root / "compare.html"
    atomic_write_text(compare, compare_page([read_run(r) for r in runs]))
    return {"report": runs[0] / "report.html", "compare": compare, "runs": runs}


@pytest.fixture(scope="module")
def long_pages(tmp_path_factory):
    """Two runs whose answers are a screen long, with words that cannot break, 16 held-out and 16 fixed prompts."""
    root = tmp_path_factory.mktemp("long")
    runs = [long_run(root / "a", name="a"), long_run(root / "b", name="b", r=16)]
    compare = root / "compare.html"
    atomic_write_text(compare, compare_page([read_run(r) for r in runs]))
    return {"report": runs[0] / "report.html", "compare": compare}


@pytest.fixture
def window_1300(browser):
    """The browser at 1,300 px wide (a laptop's window), put back afterwards."""
    browser.set_window_size(1300, 1000)
    yield browser
    browser.set_window_size(1280, 1600)


# Where a table is cut, as one line each (none: nothing is). A cell's right edge must lie inside its box: the
# nearest ancestor that clips (overflow-x not visible), else the window. Past it is allowed only where that
# box scrolls sideways and reaches the cell; the box itself must end inside the window, the page must not
# scroll sideways (its scrollbar is hidden here, and easy to miss anywhere), and no cell's text may spill out
# of its cell. With arguments[0] true, every table must fit its box outright, with no scrolling at all.
CUT_TABLES = """
const mustFit = arguments[0], doc = document.documentElement, problems = [];
if (doc.scrollWidth > doc.clientWidth) problems.push(`page scrolls sideways: ${doc.scrollWidth} > ${doc.clientWidth}`);
document.querySelectorAll('table').forEach(function (table, t) {
  const name = 'table #' + (table.id || t);
  if (!table.getClientRects().length) { problems.push(name + ' is not laid out'); return; }
  let box = table.parentElement;
  while (box !== document.body && getComputedStyle(box).overflowX === 'visible') box = box.parentElement;
  const scrolls = box !== document.body && ['auto', 'scroll'].includes(getComputedStyle(box).overflowX);
  const left = box === document.body ? 0 : box.getBoundingClientRect().left + box.clientLeft;
  const right = box === document.body ? doc.clientWidth : left + box.clientWidth;
  if (right > doc.clientWidth + 1) problems.push(`${name}: its box ends at ${right}, past the window`);
  if (mustFit && box.scrollWidth > box.clientWidth + 1)
    problems.push(`${name} needs scrolling: ${box.scrollWidth} > ${box.clientWidth}`);
  table.querySelectorAll('th, td').forEach(function (cell) {
    const edge = cell.getBoundingClientRect().right, what = `${name} cell "${cell.textContent.slice(0, 24)}"`;
    if (cell.scrollWidth > cell.clientWidth + 1)
      problems.push(`${what}: its text spills out (${cell.scrollWidth} > ${cell.clientWidth})`);
    if (edge > right + 1 && !(scrolls && edge - left + box.scrollLeft <= box.scrollWidth + 1))
      problems.push(`${what}: right edge ${edge} past its box's ${right}, and the box does not scroll to it`);
  });
});
return problems;
"""


def open_page(driver, path):
    driver.get(path.as_uri())
    driver.get_log("browser")  # drop earlier pages' entries
    driver.refresh()
    assert driver.execute_script("return document.readyState") == "complete"
    return driver


def severe_logs(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def column(driver, table_id: str, index: int, attr: str = "data-value") -> list[str]:
    return driver.execute_script(
        "return Array.from(document.getElementById(arguments[0]).tBodies[0].rows)"
        ".filter(r => r.offsetParent !== null).map(r => r.cells[arguments[1]].getAttribute(arguments[2]))",
        table_id, index, attr,
    )


def drawn_pixels(png: bytes) -> int:
    """How many pixels of a screenshot are not (near) white."""
    image = imread(io.BytesIO(png))[..., :3]
    return int((image.min(axis=-1) < 0.9).sum())


@pytest.mark.parametrize("name", ["report", "compare"])
def test_page_loads_without_console_errors(browser, pages, name):
    open_page(browser, pages[name])
    browser.find_element("css selector", "#chart-loss svg").click()  # the scripts run on interaction too
    assert severe_logs(browser) == []


@pytest.mark.parametrize("name", ["report", "compare"])
def test_curves_and_images_render(browser, pages, name, tmp_path):
    open_page(browser, pages[name])
    charts = browser.find_elements("css selector", "figure.chart .plot svg")
    assert len(charts) == 3
    for svg in charts:
        assert svg.size["width"] > 300 and svg.size["height"] > 100  # laid out (DOM)
        line = svg.find_element("css selector", "polyline")
        box = browser.execute_script("const b = arguments[0].getBBox(); return [b.width, b.height];", line)
        assert box[0] > 100 and box[1] > 0
        assert drawn_pixels(svg.screenshot_as_png) > 2000  # painted (screenshot): axes, grid, lines
    images = browser.find_elements("css selector", "img")
    for img in images:
        assert browser.execute_script("return arguments[0].naturalWidth", img) > 100
        assert img.size["width"] > 100 and drawn_pixels(img.screenshot_as_png) > 1000
    assert len(images) == (1 if name == "report" else 0)  # the flow diagram
    shot = tmp_path / f"{name}.png"
    assert browser.save_screenshot(str(shot)) and drawn_pixels(shot.read_bytes()) > 50_000


def test_report_metrics_table_equals_eval_results(browser, pages):
    open_page(browser, pages["report"])
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('#metrics tbody tr')).map(r => "
        "Array.from(r.cells).map(c => [c.textContent, c.getAttribute('data-value')]))"
    )
    with open(pages["runs"][0] / "eval_results.csv", newline="") as f:
        expected = list(csv.DictReader(f))
    assert len(cells) == len(expected)
    for row, want in zip(cells, expected, strict=False):
        base, lora = float(want["base"]), float(want["lora"])
        assert [row[1][0], row[2][0]] == [format_metric(base), format_metric(lora)]
        assert [float(row[1][1]), float(row[2][1])] == [base, lora]
        assert float(row[3][1]) == lora - base


def test_sorting_by_change_reorders_rows(browser, pages):
    open_page(browser, pages["report"])
    before = column(browser, "predictions", 0)
    assert before == [str(i) for i in range(1, len(EXAMPLES) + 1)]
    change = browser.find_element("css selector", '#predictions th[data-sort="7"] button')
    change.click()
    values = [float(v) for v in column(browser, "predictions", 7)]
    assert values == sorted(values, reverse=True) and column(browser, "predictions", 0) != before
    assert values[0] == pytest.approx(0.75) and browser.find_element(
        "css selector", '#predictions th[data-sort="7"]').get_attribute("aria-sort") == "descending"
    change.click()  # again: where LoRA hurt most comes first
    values = [float(v) for v in column(browser, "predictions", 7)]
    assert values == sorted(values) and values[0] == pytest.approx(-0.8)


def test_filter_and_hover(browser, pages):
    open_page(browser, pages["report"])
    box = browser.find_element("css selector", 'input[data-filter="predictions"]')
    box.send_keys("french")
    assert column(browser, "predictions", 0) == ["2"]
    assert browser.find_element("css selector", '[data-count="predictions"]').text == f"1 of {len(EXAMPLES)} rows"
    box.clear()
    box.send_keys(" ")  # a space matches every row
    assert len(column(browser, "predictions", 0)) == len(EXAMPLES)

    from selenium.webdriver.common.action_chains import ActionChains

    svg = browser.find_element("css selector", "#chart-loss svg")
    tip = browser.find_element("css selector", "#chart-loss .tip")
    assert not tip.is_displayed()
    # The right edge of the plot is the last step (6): the readout shows both losses there.
    ActionChains(browser).move_to_element_with_offset(svg, svg.size["width"] // 2 - 30, 0).perform()
    assert tip.is_displayed() and tip.text.splitlines() == ["step 6", "training loss: 1.6180", "held-out loss: 2.1000"]


def test_compare_sorts_by_the_difference_between_runs(browser, pages):
    open_page(browser, pages["compare"])
    last = browser.execute_script("return document.querySelectorAll('#predictions thead th').length") - 1
    browser.find_element("css selector", f'#predictions th[data-sort="{last}"] button').click()
    values = [float(v) for v in column(browser, "predictions", last)]
    # r16's LoRA scores are r8's plus 0.1 except where r8 already had 1.0.
    assert np.allclose(values, [0.1] * 5 + [0.0], atol=1e-9)
    assert column(browser, "predictions", 0)[-1] == "1"
    assert severe_logs(browser) == []


@pytest.mark.parametrize("name", ["report", "compare"])
def test_every_table_fits_a_1300px_window(window_1300, long_pages, name):
    browser = open_page(window_1300, long_pages[name])
    assert browser.execute_script("return window.innerWidth") == 1300
    browser.execute_script("document.querySelectorAll('details').forEach(d => { d.open = true; })")
    assert browser.execute_script("return document.querySelectorAll('table').length") >= 3
    # report.html's tables fit outright; compare's may scroll in their own box (it grows a column per run).
    assert browser.execute_script(CUT_TABLES, name == "report") == []
    assert severe_logs(browser) == []


def test_long_sections_fold(window_1300, long_pages):
    browser = open_page(window_1300, long_pages["report"])
    folded = browser.execute_script("return document.documentElement.scrollHeight")
    details = browser.find_element("css selector", "#predictions-details")
    table = browser.find_element("css selector", "#predictions")
    assert details.tag_name == "details" and details.get_attribute("open") is None and not table.is_displayed()
    prompts = browser.find_elements("css selector", "#examples details.prompt")
    assert [p.get_attribute("open") is not None for p in prompts] == [True] * 3 + [False] * 13
    answer = prompts[3].find_element("css selector", "blockquote")
    assert not answer.is_displayed() and prompts[0].find_element("css selector", "blockquote").is_displayed()
    assert prompts[0].find_element("css selector", "strong").text == "Base:"

    details.find_element("css selector", "summary").click()  # a click unfolds the table, and it still sorts
    assert table.is_displayed()
    browser.find_element("css selector", '#predictions th[data-sort="7"] button').click()
    values = [float(v) for v in column(browser, "predictions", 7)]
    assert len(values) == 16 and values == sorted(values, reverse=True)
    prompts[3].find_element("css selector", "summary").click()
    assert answer.is_displayed()

    browser.execute_script("document.querySelectorAll('details').forEach(d => { d.open = true; })")
    unfolded = browser.execute_script("return document.documentElement.scrollHeight")
    assert folded < unfolded / 2, (folded, unfolded)  # folded, the long lists cost a line each


# ---------------------------------------------------------------------------------------------------
# The sweep page (loralab sweep): 2 x 2 cells, 2 seeds each, read back from the runs' eval_results.csv.

SWEEP_METRICS = ("eval_loss", "bleu", "rouge1", "rouge2", "rougeL")


def _sweep_run(path, r: int, lr: str, seed: int):
    run = make_run(path, r=r, name=path.name)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"].update(seed=seed, learning_rate=float(lr))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    loss = 2.0 - r / 40 - float(lr) * 1000 + seed / 500  # every cell and seed different; r=16, lr=2e-4 lowest
    lines = ["metric,base,lora,change,change_low,change_high,lora_better,lora_worse,tied"]
    for i, name in enumerate(SWEEP_METRICS):
        base, lora = (2.1, loss) if name == "eval_loss" else (0.1 * i, 0.1 * i + r / 400 + seed / 1000)
        lines.append(f"{name},{base},{lora:.6f},{lora - base:.6f},{lora - base - 0.01:.6f},{lora - base + 0.01:.6f},"
                     f"0.5,0.3,0.2")
    (run / "eval_results.csv").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture(scope="module")
def sweep_html(tmp_path_factory):
    from loralab.reporting.sweep import SweepCell, sweep_page

    root = tmp_path_factory.mktemp("sweep")
    cells = []
    for r in (8, 16):
        for lr in ("1e-4", "2e-4"):
            label = f"r{r}-learning_rate{lr}"
            runs = [_sweep_run(root / f"s-{label}-seed{seed}", r, lr, seed) for seed in (42, 43)]
            cells.append(SweepCell(label, (("lora.r", str(r)), ("train.learning_rate", lr)),
                                   tuple(read_run(run) for run in runs), 2))
    page = root / "sweep.html"
    atomic_write_text(page, sweep_page("s", ["lora.r", "train.learning_rate"], cells, "loralab sweep s.yaml"))
    return page, cells


def test_sweep_page_loads_without_console_errors_and_its_charts_render(browser, sweep_html):
    open_page(browser, sweep_html[0])
    browser.find_element("css selector", "#chart-loss svg").click()
    charts = browser.find_elements("css selector", "figure.chart .plot svg")
    assert len(charts) == 1 + 2 * 2  # every run's curves; held-out loss and ROUGE-L against each swept key
    for svg in charts:
        assert svg.size["width"] > 300 and svg.size["height"] > 100
        line = svg.find_element("css selector", "polyline")
        box = browser.execute_script("const b = arguments[0].getBBox(); return [b.width, b.height];", line)
        assert box[0] > 100
        assert drawn_pixels(svg.screenshot_as_png) > 2000
    assert severe_logs(browser) == []


def test_sweep_table_equals_the_cells_eval_results(browser, sweep_html):
    page, cells = sweep_html
    open_page(browser, page)
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('#cells tbody tr')).map(r => "
        "Array.from(r.cells).map(c => [c.textContent, c.getAttribute('data-value')]))")
    assert len(rows) == len(cells)
    means = []
    for row, cell in zip(rows, cells, strict=True):
        assert [row[1][0], row[2][0], row[3][0]] == [cell.settings[0][1], cell.settings[1][1], "2 of 2"]
        files = []
        for run in cell.runs:
            with open(run.root / "eval_results.csv", newline="") as f:
                files.append({r["metric"]: float(r["lora"]) for r in csv.DictReader(f)})
        for j, name in enumerate(SWEEP_METRICS):
            values = [f[name] for f in files]
            mean = sum(values) / len(values)
            assert float(row[4 + j][1]) == pytest.approx(mean, abs=1e-12)
            sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            assert row[4 + j][0].startswith(f"{format_metric(mean)} ± {format_metric(sd)}")
        means.append(sum(f["eval_loss"] for f in files) / len(files))
    best = means.index(min(means))
    assert [r[0][0] for r in rows] == [f"{i + 1} (best)" if i == best else str(i + 1) for i in range(len(rows))]
