/* heat1d: transient heat conduction in a cooled rod (a small stand-alone "legacy" simulator).
 *
 *   rho_c dT/dt = k d2T/dx2 - h (T - T_amb),   0 < x < L
 *   T(0, t) = T_left (heater), dT/dx(L, t) = 0 (insulated end), T(x, 0) = T_amb
 *
 * Cell-centred finite volumes in space, backward Euler in time, a tridiagonal solve per step.
 *
 * Usage: heat1d INPUT OUTPUT
 *   INPUT  holds "key value" lines (see DEFAULTS below; '#' starts a comment). sensors is a
 *          comma-separated list of positions in (0, L).
 *   OUTPUT receives one line per output time: the time, then the temperature at each sensor.
 * Exit codes: 0 success, 1 bad usage, 2 bad input file, 3 cannot write output.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SENSORS 64

typedef struct {
  double conductivity, convection, heat_capacity, length, t_end, t_left, t_amb;
  int cells, steps, outputs, n_sensors;
  double sensors[MAX_SENSORS];
} Params;

static const char *DEFAULTS =
    "conductivity 1.0  convection 0.5  heat_capacity 1.0  length 1.0  t_end 0.5\n"
    "t_left 100.0  t_amb 20.0  cells 200  steps 500  outputs 10  sensors 0.1,0.3,0.5,0.9\n";

static int fail(int code, const char *fmt, const char *arg) {
  fprintf(stderr, "heat1d: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\n");
  return code;
}

static int set_param(Params *p, const char *key, const char *value) {
  char *end = NULL;
  if (strcmp(key, "sensors") == 0) {
    p->n_sensors = 0;
    const char *s = value;
    while (*s) {
      if (p->n_sensors == MAX_SENSORS) return 0;
      p->sensors[p->n_sensors++] = strtod(s, &end);
      if (end == s) return 0;
      s = (*end == ',') ? end + 1 : end;
      if (*end && *end != ',') return 0;
    }
    return p->n_sensors > 0;
  }
  double v = strtod(value, &end);
  if (end == value || *end) return 0;
  if (!strcmp(key, "conductivity")) p->conductivity = v;
  else if (!strcmp(key, "convection")) p->convection = v;
  else if (!strcmp(key, "heat_capacity")) p->heat_capacity = v;
  else if (!strcmp(key, "length")) p->length = v;
  else if (!strcmp(key, "t_end")) p->t_end = v;
  else if (!strcmp(key, "t_left")) p->t_left = v;
  else if (!strcmp(key, "t_amb")) p->t_amb = v;
  else if (!strcmp(key, "cells")) p->cells = (int)v;
  else if (!strcmp(key, "steps")) p->steps = (int)v;
  else if (!strcmp(key, "outputs")) p->outputs = (int)v;
  else return -1;
  return 1;
}

/* Reads "key value" pairs (several per line allowed); returns 0, or 1 with a message in msg. */
static int read_params(FILE *f, Params *p, char *msg, size_t len) {
  char line[4096];
  while (fgets(line, sizeof line, f)) {
    char *hash = strchr(line, '#');
    if (hash) *hash = '\0';
    for (char *key = strtok(line, " \t\r\n"); key; key = strtok(NULL, " \t\r\n")) {
      char *value = strtok(NULL, " \t\r\n");
      if (!value) { snprintf(msg, len, "key '%.60s' has no value", key); return 1; }
      int ok = set_param(p, key, value);
      if (ok < 0) { snprintf(msg, len, "unknown key '%.60s'", key); return 1; }
      if (!ok) { snprintf(msg, len, "bad value '%.60s' for '%.60s'", value, key); return 1; }
    }
  }
  return 0;
}

static const char *check(const Params *p) {
  if (!(p->conductivity > 0)) return "conductivity must be > 0";
  if (!(p->convection >= 0)) return "convection must be >= 0";
  if (!(p->heat_capacity > 0)) return "heat_capacity must be > 0";
  if (!(p->length > 0) || !(p->t_end > 0)) return "length and t_end must be > 0";
  if (p->cells < 2 || p->steps < 1 || p->outputs < 1 || p->outputs > p->steps)
    return "need cells >= 2, steps >= 1 and 1 <= outputs <= steps";
  for (int i = 0; i < p->n_sensors; i++)
    if (!(p->sensors[i] > 0 && p->sensors[i] < p->length)) return "sensors must lie in (0, length)";
  return NULL;
}

/* Temperature at position x by linear interpolation between cell centres. */
static double probe(const double *T, const Params *p, double x) {
  double dx = p->length / p->cells, s = x / dx - 0.5;
  if (s <= 0) return T[0];
  int i = (int)s;
  if (i >= p->cells - 1) return T[p->cells - 1];
  double w = s - i;
  return (1 - w) * T[i] + w * T[i + 1];
}

int main(int argc, char **argv) {
  if (argc == 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
    printf("usage: heat1d INPUT OUTPUT\ninput keys and defaults:\n%s", DEFAULTS);
    return 0;
  }
  if (argc != 3) return fail(1, "usage: heat1d INPUT OUTPUT (try --help)%s", "");

  Params p;
  char msg[256] = "";
  FILE *defaults = fmemopen((void *)DEFAULTS, strlen(DEFAULTS), "r");
  read_params(defaults, &p, msg, sizeof msg);
  fclose(defaults);
  FILE *in = fopen(argv[1], "r");
  if (!in) return fail(2, "cannot open input file '%s'", argv[1]);
  int bad = read_params(in, &p, msg, sizeof msg);
  fclose(in);
  if (bad) return fail(2, "input file: %s", msg);
  const char *why = check(&p);
  if (why) return fail(2, "input file: %s", why);

  int n = p.cells;
  double dx = p.length / n, dt = p.t_end / p.steps;
  double *T = malloc(n * sizeof *T), *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b),
         *c = malloc(n * sizeof *c), *r = malloc(n * sizeof *r);
  for (int i = 0; i < n; i++) T[i] = p.t_amb;
  double cond = p.conductivity * dt / (p.heat_capacity * dx * dx);
  double cool = p.convection * dt / p.heat_capacity;

  FILE *out = fopen(argv[2], "w");
  if (!out) return fail(3, "cannot write output file '%s'", argv[2]);
  int every = p.steps / p.outputs;
  for (int step = 1; step <= p.steps; step++) {
    for (int i = 0; i < n; i++) {  /* (1 + 2 cond + cool) T_i - cond (T_{i-1} + T_{i+1}) = rhs */
      a[i] = -cond; c[i] = -cond; b[i] = 1 + 2 * cond + cool;
      r[i] = T[i] + cool * p.t_amb;
    }
    b[0] += cond; r[0] += 2 * cond * p.t_left; a[0] = 0;  /* Dirichlet face at x = 0 */
    b[n - 1] -= cond; c[n - 1] = 0;                       /* insulated face at x = L */
    for (int i = 1; i < n; i++) {                          /* Thomas algorithm */
      double m = a[i] / b[i - 1];
      b[i] -= m * c[i - 1];
      r[i] -= m * r[i - 1];
    }
    T[n - 1] = r[n - 1] / b[n - 1];
    for (int i = n - 2; i >= 0; i--) T[i] = (r[i] - c[i] * T[i + 1]) / b[i];
    if (step % every == 0 && step / every <= p.outputs) {
      fprintf(out, "%.17g", step * dt);
      for (int s = 0; s < p.n_sensors; s++) fprintf(out, " %.17g", probe(T, &p, p.sensors[s]));
      fprintf(out, "\n");
    }
  }
  if (fclose(out) != 0) return fail(3, "cannot finish output file '%s'", argv[2]);
  free(T); free(a); free(b); free(c); free(r);
  return 0;
}
