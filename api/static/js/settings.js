// Generation settings, kept in localStorage (nothing secret: the API key is elsewhere). An
// empty field means "the server's default" and is left out of the request.

const STORAGE_KEY = "caldera.settings";

export const FIELDS = {
  system: { type: "text" },
  temperature: { type: "number", min: 0, max: 2 },
  top_p: { type: "number", min: 0, max: 1, minExclusive: true },
  max_tokens: { type: "integer", min: 1 },
  seed: { type: "integer" },
  detail: { type: "choice", choices: ["auto", "low", "high"] },
};

export const DEFAULTS = {
  system: "", temperature: "", top_p: "", max_tokens: "", seed: "", detail: "auto",
};

export function loadSettings() {
  try {
    return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "{}") };
  } catch {
    return { ...DEFAULTS };
  }
}

export function saveSettings(settings) {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(settings));
  } catch {
    // storage disabled: the settings last for this page only
  }
}

// Raw form values -> {settings} or {error: "..."} naming the field to fix.
export function validateSettings(raw) {
  const settings = { ...DEFAULTS };
  for (const [name, field] of Object.entries(FIELDS)) {
    const value = String(raw[name] ?? "").trim();
    if (field.type === "text") {
      settings[name] = String(raw[name] ?? "");
      continue;
    }
    if (field.type === "choice") {
      if (!field.choices.includes(value)) {
        return { error: `${name} must be one of ${field.choices.join(", ")}` };
      }
      settings[name] = value;
      continue;
    }
    if (value === "") continue;
    const number = Number(value);
    if (!Number.isFinite(number) || (field.type === "integer" && !Number.isInteger(number))) {
      const kind = field.type === "integer" ? "a whole number" : "a number";
      return { error: `${name} must be ${kind}` };
    }
    const tooLow = field.min !== undefined
      && (number < field.min || (field.minExclusive && number === field.min));
    const tooHigh = field.max !== undefined && number > field.max;
    if (tooLow || tooHigh) {
      const low = field.minExclusive ? `above ${field.min}` : `at least ${field.min}`;
      const high = field.max !== undefined ? ` and at most ${field.max}` : "";
      return { error: `${name} must be ${low}${high}` };
    }
    settings[name] = value;
  }
  return { settings };
}

// The sampling fields of a request body.
export function samplingFields(settings) {
  const body = {};
  for (const name of ["temperature", "top_p"]) {
    if (settings[name] !== "") body[name] = Number(settings[name]);
  }
  for (const name of ["max_tokens", "seed"]) {
    if (settings[name] !== "") body[name] = Number.parseInt(settings[name], 10);
  }
  return body;
}
